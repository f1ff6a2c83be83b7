"""Rematerialization strategies: how much of the forward pass BPTT keeps.

``jax.grad`` of a ``lax.scan`` stores every step's residuals (the intermediate
values the backward pass needs), so its memory grows linearly in the sequence
length ``T`` with a large constant. A strategy trades that memory for
recomputation. Strategies are small immutable values passed to
``bpttjax.scan(..., remat=...)``; they never change forward values or the
gradient, only how it is computed.

Costs below are per sequence of ``T`` steps, in units of one step's carry
(``C``) or one step's residuals (``R``, usually several times ``C``) and of one
forward pass over the sequence.

The package: ``_base`` holds the protocols (:class:`RematStrategy`,
:class:`Layer`) and the registry; each schedule has its own module
(``_every_step``, ``_nested``, ``_binomial``), and ``_revolve`` is the engine
that runs the binomial schedule.
"""

from ._base import STRATEGIES as STRATEGIES
from ._base import Cost as Cost
from ._base import Layer as Layer
from ._base import RematStrategy as RematStrategy
from ._base import StepCosts as StepCosts
from ._base import examples as examples
from ._base import from_string as from_string
from ._base import register as register

# Importing a schedule registers it, and STRATEGIES keeps that order.
# isort: off
from ._every_step import StoreAll as StoreAll
from ._every_step import EveryStep as EveryStep
from ._binomial import Binomial as Binomial
from ._nested import Nested as Nested

# isort: on

__all__ = [
    "Binomial",
    "Cost",
    "EveryStep",
    "Layer",
    "Nested",
    "RematStrategy",
    "STRATEGIES",
    "StepCosts",
    "StoreAll",
    "examples",
    "from_string",
    "register",
]
