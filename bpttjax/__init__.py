"""bpttjax: backpropagation through time in JAX, with memory you choose.

The public API is what this module re-exports, plus the documented
submodules ``bpttjax.cells``, ``bpttjax.diagnostics``, ``bpttjax.memory``,
``bpttjax.reference``, ``bpttjax.remat`` and ``bpttjax.truncation``, and the
Flax modules ``bpttjax.nnx`` and ``bpttjax.linen`` (imported on first use, so
that ``import bpttjax`` does not import Flax). Modules whose names start with
an underscore are private.
"""

from importlib import metadata as _metadata

from . import budget as budget
from . import cells as cells
from . import diagnostics as diagnostics
from . import memory as memory
from . import reference as reference
from . import remat as remat
from . import truncation as truncation
from ._scan import scan as scan
from .budget import Budget as Budget
from .budget import Plan as Plan
from .remat import Binomial as Binomial
from .remat import EveryStep as EveryStep
from .remat import Nested as Nested
from .remat import RematStrategy as RematStrategy
from .remat import StoreAll as StoreAll
from .truncation import RandomTruncate as RandomTruncate
from .truncation import Truncate as Truncate
from .truncation import TruncationStrategy as TruncationStrategy

try:  # the version lives in pyproject.toml only
    __version__ = _metadata.version("bpttjax")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = ("nnx", "linen")


def __getattr__(name: str):
    # bj.nnx and bj.linen import Flax (about 0.4 s): only when first used.
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
