"""Pure recurrent steps (tanh RNN, GRU, LSTM) and adapters for Flax cells.

Every step has the signature ``step(params, carry, x) -> (carry, y)``, so
``functools.partial(step, params)`` is an ``f(carry, x)`` for
:func:`bpttjax.scan` or ``jax.lax.scan``, and ``jax.grad`` with respect to
``params`` is BPTT. ``x`` has shape ``(..., input_size)`` and every carry
array ``(..., hidden_size)``, with any number of leading batch dimensions
(none included); ``x`` and the carry must have the same number of them.

Carries:

- ``rnn`` and ``gru``: ``h``.
- ``lstm``: ``(h, c)``, hidden state first (d2l's order). Flax's
  ``LSTMCell`` uses ``(c, h)``; :func:`from_nnx` and :func:`from_linen` keep
  Flax's own convention.

Parameters are plain dicts of arrays, gates concatenated along the last axis
so that each step does exactly one input matmul and one hidden matmul:

- ``rnn``: ``W_xh (D, H)``, ``W_hh (H, H)``, ``b_h (H,)``.
- ``gru``: ``W_x (D, 3H)``, ``W_h (H, 3H)``, ``b_x (3H,)``, ``b_hn (H,)``;
  gate order ``r, z, n``.
- ``lstm``: ``W_x (D, 4H)``, ``W_h (H, 4H)``, ``b (4H,)``; gate order
  ``i, f, g, o``.

Checkpoint names (for ``jax.checkpoint_policies.save_only_these_names`` and
friends, e.g. ``bj.EveryStep(policy=...)``):

- ``"input_projection"``: ``x @ W_x + b``, shape ``(..., k·H)`` with
  ``k = 1, 3, 4`` for rnn, gru, lstm. It does not depend on the carry.
- ``"hidden_projection"``: ``h @ W_h`` (without biases), same shape.

Saving ``"hidden_projection"`` removes the recurrent matmul from the
recomputation at the cost of ``k·H`` numbers per step and batch element.

Costs in the docstrings count ``B`` (the product of the batch dimensions)
and, for memory, the residuals plain BPTT (``bj.StoreAll()``) keeps per step
as JAX traces them, before XLA's own optimizations.

The package: ``_steps`` (the pure steps and ``init_*``) and ``_registry``
(:class:`Cell`, :data:`CELLS`, :class:`Split`) are its ground floor and
import only JAX; ``_run`` (:func:`run`), ``_fused`` (the whole-sequence
block) and ``_autotune`` (``batch_chunks="auto"``) sit on top of
:func:`bpttjax.scan` and the strategies. :func:`from_nnx` and
:func:`from_linen` live with the other Flax code (``bpttjax._flax``).
"""

from ._registry import CELLS as CELLS
from ._registry import GRU_SPLIT as GRU_SPLIT
from ._registry import LSTM_SPLIT as LSTM_SPLIT
from ._registry import RNN_SPLIT as RNN_SPLIT
from ._registry import Cell as Cell
from ._registry import Split as Split
from ._registry import get as get
from ._registry import initial_carry as initial_carry
from ._registry import register as register
from ._run import choose_batch_chunks as choose_batch_chunks
from ._run import run as run
from ._steps import Params as Params
from ._steps import Step as Step
from ._steps import gru as gru
from ._steps import init_gru as init_gru
from ._steps import init_lstm as init_lstm
from ._steps import init_rnn as init_rnn
from ._steps import lstm as lstm
from ._steps import rnn as rnn

# The facade sits above the Flax adapters it re-exports; they import only the
# modules above, never this file.
from .._flax import from_linen as from_linen  # noqa: E402 - isort: skip
from .._flax import from_nnx as from_nnx  # noqa: E402 - isort: skip

__all__ = [
    "CELLS",
    "Cell",
    "get",
    "register",
    "rnn",
    "gru",
    "lstm",
    "init_rnn",
    "init_gru",
    "init_lstm",
    "initial_carry",
    "run",
    "choose_batch_chunks",
    "Split",
    "from_nnx",
    "from_linen",
]
