"""The studies of bpttjax: one script per question, over the shared ``experiments.common``.

Run a study from the repository root as ``python experiments/<study>.py`` or
``python -m experiments.<study>``; each writes CSV (and a figure) under
``--out`` (default ``results/``).
"""
