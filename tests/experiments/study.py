"""What the scripts' tests share: run a study as its command line would, load its module.

A study is loaded under another module name (``_study_<name>``): importing it
as ``experiments.<name>`` would make :func:`run`'s ``runpy`` warn that the
module it is about to run as ``__main__`` is already loaded.
"""

import importlib.util
import os
import sys

from experiments import _cli

run = _cli.run
"""``run(script, argv)``: ``python experiments/<script>.py *argv`` in this process."""


def load(script: str):
    """The module of ``experiments/<script>.py`` (loaded once, under another name)."""
    name = f"_study_{script}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(_cli.HERE, f"{script}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]
