"""Remat policies still save what they name: a guard against JAX changing under us.

``EveryStep(policy=...)``, ``Budget``'s policy candidates and
``from_string("every_step:dots_saveable")`` hand a ``jax.checkpoint_policies``
value (or any callable) to ``jax.checkpoint``. JAX's remat rewrite in progress
treats plain-function policies as full remat (jax-ml/jax#39432): the gradient
stays right, only the memory and the recomputation change, so the shared
suite (``tests/test_remat.py``) would not notice. These tests measure both for
a tanh RNN with a per-step loss:

* XLA's working memory of the gradient: a policy keeps ``T`` copies of each
  product it saves beyond ``EveryStep()``'s carries;
* the matrix products the gradient evaluates beyond ``StoreAll``'s (which
  recomputes nothing): a saved product is not among them.
"""

import collections
import functools

import jax
import jax.numpy as jnp
import pytest
from jax.extend import core as jex_core

import bpttjax as bj

T, B, D, H = 300, 4, 16, 32
PRODUCT = B * H * 8
"""Bytes of one step's projection (``x @ W_xh + b`` or ``h @ W_hh``), float64."""
INPUT = ((B, D), (D, H), (1,), (0,))
HIDDEN = ((B, H), (H, H), (1,), (0,))
"""The two forward products as :func:`dot_evaluations` keys them: operand shapes
and contracting dimensions (``D != H`` tells them apart)."""
NAMED = {"input_projection": INPUT, "hidden_projection": HIDDEN}
BOTH = frozenset(NAMED)

dots_saveable = jax.checkpoint_policies.dots_saveable
save_only = jax.checkpoint_policies.save_only_these_names


def save_matmuls(prim, *_, **__):
    """``dots_saveable`` written as a plain function: the form jax#39432 is about."""
    return prim is jax.lax.dot_general_p


def save_nothing(*_, **__):
    return False


def problem():
    params = bj.cells.init_rnn(jax.random.key(0), D, H, jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (T, B, D), jnp.float64)
    return params, xs


def step(params, h, x):
    """One RNN step whose output is its own term of the loss."""
    h, _ = bj.cells.rnn(params, h, x)
    return h, jnp.sum(h**2)


def loss(params, xs, remat):
    h0 = bj.cells.initial_carry("rnn", H, (B,), jnp.float64)
    _, ys = bj.scan(functools.partial(step, params), h0, xs, remat=remat)
    return jnp.sum(ys)


def temp(remat):
    """XLA's working memory for the gradient of :func:`loss` under ``remat``."""
    grad = jax.grad(functools.partial(loss, remat=remat))
    return bj.memory.measure(grad, *problem()).temp_bytes


def dot_evaluations(closed_jaxpr):
    """How many times each kind of ``dot_general`` runs in a program, by its jaxpr.

    Walks every sub-jaxpr (scan, checkpoint/remat, custom rules, cond
    branches) and multiplies by the enclosing scans' lengths, so a product
    recomputed in the backward loop counts ``T`` times. The jaxpr is where a
    policy acts (partial evaluation decides what is saved and what the
    backward pass re-runs), so this sees the decision itself. It is sturdier
    than the alternatives: the compiled HLO hides trip counts in while loops
    and XLA may fuse or rewrite dots, and ``print_saved_residuals`` of the
    whole loss shows only the scan's stacked outputs, not which products they
    are. (A ``while_loop`` would count once; every strategy here is a scan.)

    Returns:
      A ``Counter`` keyed by ``(lhs shape, rhs shape, lhs contracting dims,
      rhs contracting dims)``.
    """
    counts = collections.Counter()

    def walk(jaxpr, times):
        for eqn in jaxpr.eqns:
            n = times * eqn.params["length"] if eqn.primitive.name == "scan" else times
            if eqn.primitive.name == "dot_general":
                (lhs_c, rhs_c), _ = eqn.params["dimension_numbers"]
                lhs, rhs = (v.aval.shape for v in eqn.invars)
                counts[(lhs, rhs, tuple(lhs_c), tuple(rhs_c))] += n
            for sub in jex_core.jaxprs_in_params(eqn.params):
                walk(sub, n)

    walk(closed_jaxpr.jaxpr, 1)
    return counts


def products(fn):
    """:func:`dot_evaluations` of ``fn(params, xs)`` for the RNN problem."""
    return dot_evaluations(jax.make_jaxpr(fn)(*problem()))


def recomputed(remat):
    """Products the gradient under ``remat`` evaluates beyond ``StoreAll``'s (whose
    backward pass recomputes nothing): the forward products it re-runs."""
    grad = lambda r: jax.grad(functools.partial(loss, remat=r))
    return products(grad(remat)) - products(grad(bj.StoreAll()))


@pytest.fixture(scope="module")
def every_step():
    """``EveryStep()``'s temp and recomputed products: what a policy improves on."""
    return temp(bj.EveryStep()), recomputed(bj.EveryStep())


def test_the_count_sees_the_forward_products_and_their_recomputation(every_step):
    """The yardstick: the forward pass evaluates each projection ``T`` times under
    the keys the other tests use, and ``EveryStep()`` recomputes all of them."""
    forward = products(functools.partial(loss, remat=bj.StoreAll()))
    assert forward == collections.Counter({INPUT: T, HIDDEN: T})
    assert every_step[1] == forward
    assert temp(bj.StoreAll()) > every_step[0] + 2 * T * PRODUCT


@pytest.mark.parametrize(
    ("remat", "saved"),
    [
        (bj.EveryStep(dots_saveable), BOTH),
        (bj.remat.from_string("every_step:dots_saveable"), BOTH),
        (bj.EveryStep(save_matmuls), BOTH),
        (bj.EveryStep(save_only("hidden_projection")), {"hidden_projection"}),
        (bj.EveryStep(save_only("input_projection")), {"input_projection"}),
        # negative control: the measurements tell a policy that keeps nothing
        (bj.EveryStep(save_nothing), set()),
    ],
    ids=[
        "dots_saveable",
        "from_string",
        "plain_function",
        "hidden_projection",
        "input_projection",
        "save_nothing",
    ],
)
def test_policy_keeps_and_skips_recomputing_what_it_names(remat, saved, every_step):
    """A policy keeps ``T`` copies of each product it names beyond ``EveryStep()``'s
    memory, and the backward pass recomputes exactly the products it does not name."""
    base_temp, _ = every_step
    extra = temp(remat) - base_temp
    assert abs(extra - len(saved) * T * PRODUCT) <= 0.25 * T * PRODUCT, (remat, extra)
    want = collections.Counter({NAMED[n]: T for n in NAMED if n not in saved})
    assert recomputed(remat) == want, remat


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("name", sorted(NAMED))
def test_the_cells_names_are_saved_under_save_only_these_names(cell, name, capsys):
    """Each cell attaches both names (``checkpoint_name``), and a step checkpointed
    with ``save_only_these_names(name)`` saves a residual by that name, the
    other one not."""
    c = bj.cells.get(cell)
    params = c.init(jax.random.key(0), D, H, jnp.float64)
    h = bj.cells.initial_carry(cell, H, (B,), jnp.float64)
    x = jnp.zeros((B, D), jnp.float64)
    names = [
        e.params["name"]
        for e in jax.make_jaxpr(c.step)(params, h, x).eqns
        if e.primitive.name == "name"
    ]
    assert sorted(names) == sorted(NAMED), names
    jax.ad_checkpoint.print_saved_residuals(
        jax.checkpoint(c.step, policy=save_only(name)), params, h, x
    )
    saved = capsys.readouterr().out
    other = next(n for n in NAMED if n != name)
    assert f"named '{name}'" in saved and f"named '{other}'" not in saved, saved


@pytest.mark.parametrize(
    ("policies", "expected", "saved", "between"),
    [
        (None, bj.EveryStep(dots_saveable), 2, ("dots", "store_all")),
        (
            (dots_saveable, save_only("hidden_projection")),
            bj.EveryStep(save_only("hidden_projection")),
            1,
            ("hidden", "dots"),
        ),
    ],
    ids=["default_dots_saveable", "hidden_projection"],
)
def test_budget_predicts_the_policy_it_picks(policies, expected, saved, between, every_step):
    """A budget between two strategies' measured temps picks the policy below it,
    predicts XLA's temp for it within 10%, and the prediction holds what the
    policy saves (``T`` of each of its ``saved`` products) beyond ``EveryStep()``.
    The first row is ``Budget``'s default candidate (``policies=None`` here),
    ``dots_saveable``; in the second, the candidate saving most that fits is
    chosen."""
    temps = {
        "store_all": temp(bj.StoreAll()),
        "dots": temp(bj.EveryStep(dots_saveable)),
        "hidden": temp(bj.EveryStep(save_only("hidden_projection"))),
    }
    low, high = (temps[k] for k in between)
    params, xs = problem()
    h0 = bj.cells.initial_carry("rnn", H, (B,), jnp.float64)
    budget = bj.Budget((low + high) // 2)
    if policies is not None:
        budget = bj.Budget(budget.bytes, policies=policies)
    plan = budget.plan(functools.partial(step, params), h0, xs)
    assert plan.strategy == expected, str(plan)
    measured = temp(plan.strategy)
    assert abs(plan.temp_bytes - measured) <= 0.1 * measured, (plan.temp_bytes, measured)
    assert plan.temp_bytes - every_step[0] >= 0.75 * saved * T * PRODUCT, str(plan)
