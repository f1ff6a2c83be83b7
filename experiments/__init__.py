"""The studies of bpttjax: one script per question (``experiments/README.md`` lists them).

Run a study from the repository root as ``python experiments/<study>.py`` or
``python -m experiments.<study>``; each writes CSV (and a figure) under
``--out`` (default ``results/``). The underscored modules are what the
scripts share: the command line (``_cli``), CSV tables (``_table``), the
benchmark model (``_model``), the harness and its catalogue of methods
(``_harness``, ``_methods``) and the memory/time sweep (``_sweep``);
``tasks/`` holds the learning tasks (character language model, adding problem).
"""
