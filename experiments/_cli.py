"""The scripts' command lines, progress bars and figures.

:func:`parser` adds the options every script shares (``--out``, ``--backend``,
and where asked ``--quick`` and ``--fresh``); :func:`parse` applies the
``--quick`` defaults and starts the backend. The argparse types below turn
bad input into an argparse error that names the option. :func:`run` runs a
script in this process exactly as its command line would, which is how the
tests drive them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import runpy
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

import bpttjax as bj

R = TypeVar("R")
HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("cpu", "gpu", "tpu")


def run(script: str, argv: Sequence[str] = ()) -> None:
    """Run ``experiments/<script>.py`` in this process with the command line ``argv``.

    The same as ``python -m experiments.<script> *argv``, without a new
    interpreter: JAX's compilation caches are shared. ``SystemExit`` (a bad
    option) propagates.
    """
    saved = sys.argv
    sys.argv = [os.path.join(HERE, f"{script}.py"), *map(str, argv)]
    try:
        if __package__:
            # as `python -m` would: a copy imported earlier (a test that read its
            # names) is not this run's __main__, and runpy warns about it
            sys.modules.pop(f"{__package__}.{script}", None)
            runpy.run_module(f"{__package__}.{script}", run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = saved


# ------------------------------------------------------------ command lines ---


def parser(
    doc: str, *, quick: str | None = None, fresh: str | None = None, **kwargs: Any
) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` described by ``doc``'s first paragraph, with the shared options.

    Every script takes ``--out`` (default ``results``) and ``--backend``;
    ``quick`` and ``fresh`` are the help texts of ``--quick`` and ``--fresh``,
    which are added only when given. ``kwargs`` go to ``ArgumentParser``.
    """
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], **kwargs)
    p.add_argument("--out", default="results", help="folder for the results")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="default: JAX's default")
    if quick:
        p.add_argument("--quick", action="store_true", help=quick)
    if fresh:
        p.add_argument("--fresh", action="store_true", help=fresh)
    return p


def parse(
    p: argparse.ArgumentParser, argv: Sequence[str] | None = None, quick: Mapping | None = None
) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick``, ``quick`` replaces the defaults; start ``--backend``.

    Options given explicitly still win over the quick values. A parser with
    ``--devices`` (:func:`add_devices_option`) asks for that many devices
    before the backend starts, and exits if JAX has fewer.
    """
    if quick is not None and p.parse_known_args(argv)[0].quick:
        p.set_defaults(**quick)
    args = p.parse_args(argv)
    devices = getattr(args, "devices", 1)
    if devices > 1:
        request_cpu_devices(devices)
    if args.backend is not None:
        select_backend(p, args.backend)
    if devices > 1 and jax.device_count() < devices:
        p.error(
            f"--devices {devices}: JAX has {jax.device_count()} {jax.default_backend()} "
            f"device(s). On CPU the script asks XLA for {devices} simulated devices, which "
            "works only before JAX starts: run it as a command, or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}"
        )
    return args


DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")
"""The XLA flag that sets the number of simulated CPU devices."""


def add_devices_option(p: argparse.ArgumentParser) -> None:
    """``--devices N``: shard the batch over a 1-D mesh of ``N`` devices."""
    p.add_argument(
        "--devices",
        type=positive_int,
        default=1,
        help="shard the batch over a 1-D mesh of N devices and report memory per device "
        "(default 1); on CPU, N simulated devices are asked of XLA before JAX starts",
    )


def request_cpu_devices(n: int) -> bool:
    """Ask XLA for at least ``n`` CPU devices, if JAX has not started a backend yet.

    Sets ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` (raising
    a smaller count already there), which XLA reads when the CPU backend
    starts; GPU and TPU backends are not affected. Returns False when the
    backend had already started (then the flag would have no effect).
    """
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    match = DEVICE_FLAG.search(flags)
    wanted = f"--xla_force_host_platform_device_count={n}"
    if match is None:
        flags = f"{flags} {wanted}".strip()
    elif int(match.group(1)) < n:
        flags = flags.replace(match.group(0), wanted)
    os.environ["XLA_FLAGS"] = flags
    return True


def platforms(backend: str, known) -> str:
    """The ``jax_platforms`` value that starts ``backend`` among the ``known`` platforms.

    ``"gpu"`` is no platform of its own: JAX then tries both ``cuda`` and ``rocm``
    and fails on the one it lacks. It becomes the GPU platforms this JAX has.
    """
    if backend != "gpu":
        return backend
    return ",".join(n for n in ("cuda", "rocm") if n in known) or backend


def select_backend(p: argparse.ArgumentParser, backend: str) -> None:
    """Point JAX at ``backend``; only possible before JAX has started a backend."""
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        names = platforms(backend, xla_bridge._backend_factories)
        if names == "gpu":
            p.error("--backend gpu: this JAX has no GPU platform (pip install jax[cuda13])")
        jax.config.update("jax_platforms", names)
    try:
        actual = jax.default_backend()
    except RuntimeError as err:
        p.error(f"--backend {backend}: JAX cannot start it ({err})")
    if actual != backend:
        p.error(
            f"--backend {backend}: JAX is running on {actual!r} (the backend was already "
            "started in this process, or this JAX has no such backend)"
        )


def from_args(cls: type[R], args: argparse.Namespace) -> R:
    """The dataclass ``cls`` with every field taken from the option of the same name."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def add_cell_option(p: argparse.ArgumentParser, default: str) -> None:
    """``--cell``: a name in ``bj.cells.CELLS``."""
    p.add_argument("--cell", choices=tuple(bj.cells.CELLS), default=default)


def add_remat_option(p: argparse.ArgumentParser, default: str) -> None:
    """``--remat``: any spec ``bj.remat.from_string`` reads, kept as text (``nested:3``)."""
    names = ", ".join(bj.remat.STRATEGIES)
    p.add_argument(
        "--remat", type=remat_spec, default=default, help=f"{names}, with ':arg' (e.g. nested:3)"
    )


def add_model_options(p: argparse.ArgumentParser, cell: str = "rnn") -> None:
    """``--cell`` (a registered cell), ``--batch``, ``--input``, ``--hidden`` (32, 64, 256)."""
    add_cell_option(p, cell)
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--input", type=positive_int, default=64)
    p.add_argument("--hidden", type=positive_int, default=256)


# ---------------------------------------------------------- argparse types ---


def cell_name(text: str) -> str:
    """argparse type: a registered cell (``bj.cells.CELLS``)."""
    if text not in bj.cells.CELLS:
        raise argparse.ArgumentTypeError(
            f"expects a cell in {', '.join(bj.cells.CELLS)}, got {text!r}"
        )
    return text


def _type_error(what: str, text: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"expects {what}, got {text!r}")


def int_at_least(low: int, what: str | None = None) -> Callable[[str], int]:
    """argparse type: an int >= ``low`` (``what`` describes it in errors)."""
    what = what or f"an int >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise _type_error(what, text) from None
        if value < low:
            raise _type_error(what, text)
        return value

    return parse


positive_int = int_at_least(1, "a positive int")
"""argparse type: an int >= 1 (``1_000_000`` is accepted, as by ``int``)."""
non_negative_int = int_at_least(0, "a non-negative int")
"""argparse type: an int >= 0."""


def float_in(
    low: float, high: float, *, low_included: bool = False, high_included: bool = False
) -> Callable[[str], float]:
    """argparse type: a float between ``low`` and ``high`` (excluded unless ``*_included``)."""
    bounds = f"{'[' if low_included else '('}{low:g}, {high:g}{']' if high_included else ')'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise _type_error(f"a number in {bounds}", text) from None
        above = low < value or (low_included and value == low)
        below = value < high or (high_included and value == high)
        if not (above and below):
            raise _type_error(f"a number in {bounds}", text)
        return value

    return parse


positive_float = float_in(0.0, math.inf)
"""argparse type: a finite float > 0 (learning rates, clipping norms)."""


def comma_list(item: Callable[[str], Any]) -> Callable[[str], list]:
    """argparse type: comma-separated values of type ``item``, sorted, without repeats."""

    def parse(text: str) -> list:
        parts = [s.strip() for s in text.split(",") if s.strip()]
        if not parts:
            raise _type_error("comma-separated values", text)
        return sorted({item(s) for s in parts})

    return parse


lengths = comma_list(positive_int)
"""argparse type: comma-separated positive ints (sequence lengths), sorted."""

BYTES_HELP = "bytes, or a size with a unit: kB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB"
"""What :func:`parse_bytes` accepts, for the options' help."""


def parse_bytes(text: str) -> int:
    """argparse type: a positive size, read by ``bj.budget.parse_bytes`` (``8GiB``, ``500MB``)."""
    try:
        return bj.budget.parse_bytes(text)
    except ValueError:
        raise _type_error(f"a positive size: {BYTES_HELP} (e.g. 8GiB, 500MB)", text) from None


def float_dtype(text: str) -> str:
    """argparse type: the name of a floating dtype (``float32``)."""
    try:
        dtype = jnp.dtype(text)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise _type_error("a floating dtype such as float32", text)
    return dtype.name


def remat_spec(text: str) -> str:
    """argparse type: a strategy spec ``bj.remat.from_string`` reads (``nested:3``)."""
    try:
        bj.remat.from_string(text)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text.strip()


# ------------------------------------------------------ progress and figures ---


class Quiet:
    """What :func:`progress` returns without tqdm: iterable, a context, every method a no-op."""

    def __init__(self, iterable: Iterable | None = None):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def progress(iterable: Iterable | None = None, *, total=None, desc=None, initial=0, unit="it"):
    """A tqdm bar when stderr is a terminal, else a silent stand-in with the same methods.

    Iterate it, or drive it with ``update``, ``set_postfix_str`` and
    ``close`` (or ``with``). tqdm comes with the ``experiments`` extra; the
    scripts run without it.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return Quiet(iterable)
    return tqdm(
        iterable,
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not sys.stderr.isatty(),
    )


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (figures go to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 110, rect: tuple | None = None) -> str:
    """Lay out (inside ``rect`` if given), write and close a matplotlib figure; returns ``path``."""
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
