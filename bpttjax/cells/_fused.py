"""The whole-sequence path of the library's cells: one recurrence, weight gradients in bulk.

``jax.grad`` of a ``lax.scan`` over a cell's step does, at every step of the
backward loop, two small matrix products with the recurrent kernel (the
carry's cotangent, and the kernel's own gradient, added into an
accumulator) and two with the input kernel. Only the first one is
recurrent. :class:`FusedLayer` runs a block of steps under a ``jax.custom_vjp``
whose backward loop does just that product and the elementwise part; it
stacks the pre-activations' cotangents, and after the loop computes the
kernels' and the inputs' gradients as a few large matrix products over all
the steps of the block (``(steps·batch, H)ᵀ @ (steps·batch, k·H)``), which
run near the machine's matrix-product peak instead of at the speed of
``batch``-row products.

A cell describes its step to this module as a :class:`~bpttjax.cells.Split`:
``step(params, carry, x) = elem(params, carry, mix(project(params, x),
hidden(params, carry)))``, with ``project`` and ``hidden`` linear in the
parameters and ``mix`` linear. The strategies decide which blocks run this
way (:meth:`bpttjax.RematStrategy.scan_layer`): ``StoreAll`` runs the whole
sequence as one block, ``Nested`` its innermost blocks, and the others
step by step through :func:`bpttjax.scan`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .._scan import scan as _bj_scan
from .._tree import index, stack_zeros, store
from ..remat import RematStrategy
from ..truncation import TruncationStrategy
from ._registry import Split
from ._reversal import bulk_grads, flat, mix_transpose, step_back
from ._reversal import products as _products


def _add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)


def _zeros_from(tree: Any, shape: tuple, dtype: Any = None) -> jax.Array:
    """Zeros of ``shape`` made from ``tree``'s first leaf (its dtype unless ``dtype`` is given).

    Broadcast from a zero of that leaf, so that they have its sharding (an
    explicit mesh) and its varying axes (``shard_map``), which abstract
    shapes would not carry; ``shape`` extends the leaf's leading axes.
    """
    ref = jax.tree.leaves(tree)[0]
    zeros = jnp.broadcast_to(jnp.zeros_like(ref[..., :1]), shape)
    return zeros if dtype is None else zeros.astype(dtype)


@dataclasses.dataclass(kw_only=True, eq=False)
class FusedLayer:
    """A cell with its parameters, inputs and options, runnable by any strategy: the
    library's implementation of the :class:`bpttjax.remat.Layer` protocol.

    Built by :func:`bpttjax.cells.run`; a strategy's ``scan_layer`` calls
    :meth:`block` for the steps it keeps every residual of, and
    :meth:`scan` for the rest.

    Attributes:
      split: the cell's :class:`~bpttjax.cells.Split`.
      step_fn: the full step ``step_fn(params, carry, x)`` (:meth:`step` binds
        the parameters).
      params, xs: the parameters and the time-major inputs.
      length: the number of steps ``T``.
      reverse, unroll: as in :func:`bpttjax.scan`.
      truncation: ``None`` or a truncation strategy.
      hoist: compute a block's input projection as one product before its loop.
      chunks: the number of row groups of the batch that the loops run as
        independent chains (see :func:`_pieces`); 1 runs the batch whole.
    """

    split: Split
    step_fn: Callable
    params: Any
    xs: jax.Array
    length: int
    reverse: bool = False
    unroll: int | bool = 1
    truncation: TruncationStrategy | None = None
    hoist: bool = False
    chunks: int = 1

    @property
    def key(self) -> tuple:
        """The functions and options that fix this layer's program (its arrays aside)."""
        return (self.split, self.step_fn, self.reverse, self.unroll, self.hoist, self.chunks)

    def replace(self, **changes: Any) -> FusedLayer:
        """A copy with the given fields replaced (``params``, ``xs``, ``length``...)."""
        return dataclasses.replace(self, **changes)

    def step(self, carry: Any, x: jax.Array) -> tuple[Any, jax.Array]:
        """One step with this layer's parameters: ``f(carry, x)`` for :func:`bpttjax.scan`."""
        return self.step_fn(self.params, carry, x)

    def scan(self, remat: RematStrategy, init: Any) -> tuple[Any, jax.Array]:
        """The whole sequence step by step under ``remat``, through :func:`bpttjax.scan`."""
        return _bj_scan(
            self.step,
            init,
            self.xs,
            reverse=self.reverse,
            unroll=self.unroll,
            remat=remat,
            truncation=self.truncation,
        )

    def block(self, carry: Any, start: Any, n: int) -> tuple[Any, jax.Array]:
        """Steps ``[start, start + n)`` (positions in ``xs``) as one block.

        ``start`` may be traced (a block of an outer loop); ``n`` is static.
        """
        if isinstance(start, int) and start == 0 and n == self.length:
            xs = self.xs
        else:
            xs = jax.lax.dynamic_slice_in_dim(self.xs, start, n, axis=0)
        scales = _scales(self, self.truncation, jnp.asarray(start, jnp.int32), n)
        return _block_vjp(self)(self.params, carry, xs, scales)

    def step_back(self, carry: Any, t: Any, d_carry: Any, d_y: jax.Array) -> tuple:
        """Step ``t`` (a position in ``xs``) from ``carry``, and only its carry's cotangent.

        Returns ``((new_carry, y), d_entering, row)``; :meth:`bulk_grads`
        turns rows into the weight and input gradients (see
        :func:`._reversal.step_back`). The truncation is the caller's to apply.
        """
        return step_back(self.split, self.params, carry, index(self.xs, t), d_carry, d_y)

    def bulk_grads(self, carries: Any, ts: jax.Array, rows: Any) -> tuple[Any, jax.Array]:
        """``(d_params, d_xs_rows)`` for the steps at positions ``ts`` (stacked ``carries``
        and :meth:`step_back` ``rows``; a zero row contributes nothing)."""
        return bulk_grads(self.split, self.params, jnp.take(self.xs, ts, axis=0), carries, rows)


def _scales(
    layer: FusedLayer, truncation: TruncationStrategy | None, start: jax.Array, n: int
) -> jax.Array | None:
    """The truncation factor of the carry entering each step of a block, by position."""
    if truncation is None:
        return None
    pos = start + jnp.arange(n, dtype=jnp.int32)
    counter = layer.length - 1 - pos if layer.reverse else pos
    return jax.vmap(truncation.scale)(counter, pos)


def _check_output_leaf(sp: Any, pe: Any, carry: Any, z: Any, k: int) -> None:
    """``ValueError`` unless ``sp.elem``'s output is, as traced, its new carry's leaf ``k``.

    The outputs stand in for that leaf's stack in the residuals; anything
    else would give wrong gradients, so the jaxpr of ``elem`` must return the
    same variable for both.
    """
    outs = jax.make_jaxpr(sp.elem)(pe, carry, z).jaxpr.outvars
    n = len(jax.tree.leaves(carry))
    if len(outs) != n + 1 or outs[k] is not outs[n]:
        raise ValueError(
            f"Split(output_leaf={k}) says that elem returns its new carry's leaf {k} as its "
            "output, but it returns something else; set output_leaf=None"
        )


def _pretransposed(params: Any) -> Callable[[], Any]:
    """``params`` for use inside a backward loop, its matrices transposed once before it.

    The loop's product ``dz @ W_hᵀ`` (the carry's cotangent) contracts ``W_h``
    over its second axis; XLA's CPU product then reads ``W_h`` across its rows
    at every step, which is slower than a product with a row-major right
    operand. Transposing once outside the loop (behind an optimization
    barrier, so the two transposes do not cancel) gives XLA ``W_hᵀ`` in rows;
    inside the loop each matrix is used as ``(W_hᵀ)ᵀ``, which XLA folds into
    the product's dimensions. Returns a function to call inside the loop.
    """
    is_matrix = lambda a: jnp.ndim(a) == 2
    transposed = jax.lax.optimization_barrier(
        jax.tree.map(lambda a: a.T if is_matrix(a) else a, params)
    )
    return lambda: jax.tree.map(lambda a: a.T if is_matrix(a) else a, transposed)


def _pieces(carry: Any, xs: jax.Array, n: int) -> list:
    """The batch's row groups ``(offset, size)`` for ``n`` chains, or ``[None]`` for one.

    Every batch row's recurrence is independent of the others'. Split into
    groups that the loop bodies run side by side, a step is ``n`` chains of
    small operations with no dependence between them, and XLA's CPU runtime
    runs independent operations concurrently on its threads: the gates and
    activations of one group run beside the other's, and so do the groups'
    products, which XLA splits over the threads only when they are large.
    Whether that pays depends on the sizes (``docs/layers.md``). ``n`` groups
    need a batch axis shared by the carry and the inputs, held whole by this
    device; more groups than rows give one row each.
    """
    leaves = jax.tree.leaves(carry)
    if n <= 1 or xs.ndim < 3 or xs.shape[1] < 2 or not _batch_is_local():
        return [None]
    rows = xs.shape[1]
    if any(jnp.ndim(a) < 2 or jnp.shape(a)[0] != rows for a in leaves):
        return [None]
    n = min(n, rows)
    return [(rows * j // n, rows * (j + 1) // n - rows * j // n) for j in range(n)]


def _batch_is_local() -> bool:
    """Whether the arrays traced here are one device's own: one device, or inside ``shard_map``.

    A batch sharded over several devices (``jax.jit`` of sharded inputs, an
    explicit mesh) is not split into row groups: the groups' slices would cut
    across the devices' shards (an explicit mesh refuses such slices).
    """
    if jax.device_count() == 1:
        return True
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and all(t == jax.sharding.AxisType.Manual for t in mesh.axis_types)


def _rows(tree: Any, piece: Any, axis: int = 0) -> Any:
    """Rows ``piece = (offset, size)`` of every leaf along ``axis``; all of them for ``None``."""
    if piece is None:
        return tree
    start, size = piece
    return jax.tree.map(lambda a: jax.lax.slice_in_dim(a, start, start + size, axis=axis), tree)


def _start(a: jax.Array, t: Any, piece: tuple) -> tuple:
    """The start of step ``t``'s rows ``piece`` in a stack ``a``, in ``t``'s integer type."""
    t = jnp.asarray(t)
    return (t, jnp.asarray(piece[0], t.dtype)) + (jnp.zeros((), t.dtype),) * (a.ndim - 2)


def _get(stacks: Any, t: jax.Array, piece: Any) -> Any:
    """Step ``t``'s rows ``piece`` of stacks ``(steps, batch, ...)``: ``index`` for ``None``."""
    if piece is None:
        return index(stacks, t)

    def get(a):
        return jax.lax.dynamic_slice(a, _start(a, t, piece), (1, piece[1], *a.shape[2:]))[0]

    return jax.tree.map(get, stacks)


def _put(stacks: Any, t: jax.Array, piece: Any, value: Any) -> Any:
    """``value`` written as step ``t``'s rows ``piece`` of ``stacks``: ``store`` for ``None``."""
    if piece is None:
        return store(stacks, t, value)

    def put(a, v):
        return jax.lax.dynamic_update_slice(a, v[None].astype(a.dtype), _start(a, t, piece))

    return jax.tree.map(put, stacks, value)


def _join(parts: list) -> Any:
    """The row groups' trees put back together along the batch axis."""
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *parts)


def _dz_stack(sp: Any, params: Any, init: Any, xs: jax.Array, d_ys: Any) -> Any:
    """Zeros for the stack of ``dz`` over the block's steps, made from the outputs'
    cotangent (:func:`_zeros_from`)."""
    z = jax.eval_shape(
        lambda p, c, x: sp.mix(sp.project(p, x), sp.hidden(p, c)), params, init, xs[0]
    )
    return jax.tree.map(lambda a: _zeros_from(d_ys, (xs.shape[0], *a.shape), a.dtype), z)


def _block_vjp(layer: FusedLayer) -> Callable:
    """``block(params, carry, xs, scales)``: a custom_vjp closing over the layer's functions.

    ``scales`` (``None`` without truncation) are the factors of the carry's
    cotangent entering each step.
    """
    sp = layer.split

    def stepper(params, xs):
        """The per-step inputs (the projected ones when hoisted) and the step on them."""
        pe = sp.elem_args(params)
        if layer.hoist:
            inputs = jnp.reshape(sp.project(params, flat(xs)), xs.shape[:-1] + (-1,))
        else:
            inputs = xs

        def step(c, a):
            xw = a if layer.hoist else sp.project(params, a)
            z = sp.mix(xw, sp.hidden(params, c))
            c_new, y = sp.elem(pe, c, z)
            return c_new, y, z

        return inputs, step

    def forward(params, carry, xs):
        inputs, step = stepper(params, xs)
        pieces = _pieces(carry, xs, layer.chunks)
        if pieces == [None]:
            body = lambda c, a: step(c, a)[:2]
            return jax.lax.scan(body, carry, inputs, reverse=layer.reverse, unroll=layer.unroll)

        def chains(cs, a):
            news = [step(c, _rows(a, p)) for p, c in zip(pieces, cs, strict=True)]
            return [c for c, _, _ in news], _join([y for _, y, _ in news])

        cs = [_rows(carry, p) for p in pieces]
        cs, ys = jax.lax.scan(chains, cs, inputs, reverse=layer.reverse, unroll=layer.unroll)
        return _join(cs), ys

    def first_last(n):
        """The first and the last step the forward loop runs, and each step's predecessor."""
        if layer.reverse:
            return n - 1, 0, lambda t: t + 1
        return 0, n - 1, lambda t: t - 1

    def output_leaf(carry, xs):
        """The carry leaf the outputs stand in for in the residuals, or ``None``.

        The outputs replace that leaf's stack at the price of rolling the
        inputs (and their gradient) by one step: kept only where the inputs
        are no wider than the leaf.
        """
        k = sp.output_leaf
        leaves = jax.tree.leaves(carry)
        if k is not None and k >= len(leaves):
            raise ValueError(
                f"Split(output_leaf={k}) names a carry leaf, but the carry has {len(leaves)}"
            )
        if k is None or xs.shape[-1] > leaves[k].shape[-1]:
            return None
        return k

    def z_slot(k, n, t):
        # With the outputs standing in for the carry's leaf k, step t's z (and
        # later its dz) sits where its entering carry sits among the outputs:
        # at its predecessor's slot, and the first step's at the last step's.
        if k is None:
            return t
        first, last, prev = first_last(n)
        return jnp.where(t == first, last, prev(t))

    def forward_keep(params, carry, xs, k):
        """The forward loop, keeping the outputs, the carry's leaves other than ``k``, and ``z``.

        ``z`` only without ``Split.output_vjp`` (``zs`` is ``None`` then).
        """
        n = xs.shape[0]
        inputs, step = stepper(params, xs)
        leaves = jax.tree.leaves(carry)
        kept = [i for i in range(len(leaves)) if i != k]
        pieces = _pieces(carry, xs, layer.chunks)

        def write(cs, news, t, bufs):
            """Each row group's new carry, its values written into the stacks."""
            zs, ys, others = bufs
            for p, c, (_, y, z) in zip(pieces, cs, news, strict=True):
                c_leaves = jax.tree.leaves(c)
                if zs is not None:
                    zs = _put(zs, z_slot(k, n, t), p, z)
                ys = _put(ys, t, p, y)
                others = _put(others, t, p, [c_leaves[i] for i in kept])
            return [c_new for c_new, _, _ in news], (zs, ys, others)

        # The first step runs before the loop: the stacks are made from its
        # values, so that they have their sharding (an explicit mesh) and their
        # varying axes (shard_map), as lax.scan's stacked outputs would.
        t0 = n - 1 if layer.reverse else 0
        cs = [_rows(carry, p) for p in pieces]
        x0 = index(inputs, t0)
        news = [step(c, _rows(x0, p)) for p, c in zip(pieces, cs, strict=True)]
        _, y0, z0 = _join(news)
        if k is not None:
            _check_output_leaf(sp, sp.elem_args(params), carry, z0, k)

        keep_z = sp.output_vjp is None
        bufs = stack_zeros(n, (z0 if keep_z else None, y0, [leaves[i] for i in kept]))
        state = write(cs, news, t0, bufs)

        def loop(j, state):
            cs, bufs = state
            t = (n - 1 - j) if layer.reverse else j
            news = [step(c, _get(inputs, t, p)) for p, c in zip(pieces, cs, strict=True)]
            return write(cs, news, t, bufs)

        cs, (zs, ys, others) = jax.lax.fori_loop(1, n, loop, state, unroll=layer.unroll)
        return _join(cs), ys, zs, others

    @jax.custom_vjp
    def block(params, carry, xs, scales):
        return forward(params, carry, xs)

    def block_fwd(params, carry, xs, scales):
        k = output_leaf(carry, xs)
        carry_out, ys, zs, others = forward_keep(params, carry, xs, k)
        # the outputs are residuals where they stand in for the carry's leaf k,
        # or where elem's VJP is taken from them
        ys_res = None if k is None and sp.output_vjp is None else ys
        if k is None:
            others = jax.tree.unflatten(jax.tree.structure(carry), others)
        return (carry_out, ys), (params, xs, carry, others, ys_res, zs, scales)

    def block_bwd(res, cotangents):
        params, xs, init, kept_stacks, ys_res, zs, scales = res
        d_carry, d_ys = cotangents
        pe = sp.elem_args(params)
        n = xs.shape[0]
        init_leaves, treedef = jax.tree.flatten(init)
        k = output_leaf(init, xs)
        kept = [i for i in range(len(init_leaves)) if i != k]

        pieces = _pieces(init, xs, layer.chunks)

        def entering_carry(t, p):
            """Rows ``p`` of the carry entering step ``t``: the kept stacks' (and outputs')."""
            if k is None:
                return _get(kept_stacks, t, p)
            first, _, prev = first_last(n)
            leaves: list[Any] = [None] * len(init_leaves)
            for o, i in zip(kept_stacks, kept, strict=True):
                leaves[i] = _get(o, t, p)
            y_prev = _get(ys_res, jnp.clip(prev(t), 0, n - 1), p)
            leaves[k] = jnp.where(t == first, _rows(init_leaves[k], p), y_prev)
            return jax.tree.unflatten(treedef, leaves)

        x_width = jax.eval_shape(sp.project, params, xs[0]).shape[-1]
        h_width = jax.eval_shape(sp.hidden, params, init).shape[-1]
        loop_params = _pretransposed(params)

        def body(acc, inputs):
            """One step back; ``r`` is the step's ``z``, or its output ``y`` with ``output_vjp``."""
            dc, dpe = acc
            c, r, dy, s = inputs
            if sp.output_vjp is None:
                _, elem_vjp = jax.vjp(sp.elem, pe, c, r)
                dpe_t, dc_direct, dz = elem_vjp((dc, dy))
            else:
                dpe_t, dc_direct, dz = sp.output_vjp(pe, c, r, (dc, dy))
            _, dhw = mix_transpose(sp.mix, dz, x_width, h_width)
            _, hidden_vjp = jax.vjp(lambda c: sp.hidden(loop_params(), c), c)
            (dc_hidden,) = hidden_vjp(dhw)
            dc = _add(dc_direct, dc_hidden)
            if s is not None:
                # an exact zero at a cut, so that it also stops inf/nan, as stop_gradient would
                dc = jax.tree.map(
                    lambda a: jnp.where(s == 0, jnp.zeros_like(a), a * s.astype(a.dtype)), dc
                )
            return (dc, _add(dpe, dpe_t)), dz

        step_at = (lambda j: j) if layer.reverse else (lambda j: n - 1 - j)

        # Each step's dz is written over its own z in the residual stack, which
        # becomes the stack of dz: one stack of that size, not two (docs/layers.md
        # has what it saves).
        # The next step's z is read from the stack after the writes, and
        # carried: read from the stack before them (or fused into the step's
        # ops), it made XLA copy the whole stack at every step to keep the
        # write in place. Each row group carries its own cotangent and z.
        # With output_vjp there is no stack of z: the dz go into a stack of
        # their own, and each step reads its output instead.
        keep_z = zs is not None

        def residual(stack, t, p):
            return _get(stack, z_slot(k, n, t), p) if keep_z else None

        def loop(j, state):
            dcs, dpe, stack, zs_t = state
            t = step_at(j)
            s = None if scales is None else scales[t]
            steps = []
            for p, dc, z in zip(pieces, dcs, zs_t, strict=True):
                r = z if keep_z else _get(ys_res, t, p)
                (dc, dpe), dz = body((dc, dpe), (entering_carry(t, p), r, _get(d_ys, t, p), s))
                steps.append((dc, dz))
            for p, (_, dz) in zip(pieces, steps, strict=True):
                stack = _put(stack, z_slot(k, n, t), p, dz)
            t_next = step_at(jnp.minimum(j + 1, n - 1))
            zs_t = [residual(stack, t_next, p) for p in pieces]
            return [dc for dc, _ in steps], dpe, stack, zs_t

        stack = zs if keep_z else _dz_stack(sp, params, init, xs, d_ys)
        state = (
            [_rows(d_carry, p) for p in pieces],
            jax.tree.map(jnp.zeros_like, pe),
            stack,
            [residual(stack, step_at(0), p) for p in pieces],
        )
        dcs, d_pe, dzs, _ = jax.lax.fori_loop(0, n, loop, state, unroll=layer.unroll)
        d_init = _join(dcs)

        # The products over every step of the block. On one device as matrices
        # (steps and batch merged: XLA's CPU products are fastest so); on several,
        # over the stacks as they are, so that a sharded batch stays sharded.
        matrices = flat if jax.device_count() == 1 else (lambda tree: tree)

        def products(x, c, dz):
            return _products(sp, params, x, c, dz)

        if k is None:
            d_params, d_xs = products(matrices(xs), matrices(kept_stacks), matrices(dzs))
            d_xs = jnp.reshape(d_xs, xs.shape)
        else:
            # Row r of the dz stack belongs to the step whose entering carry is
            # row r of the outputs (the first step's sits in the last step's
            # row); the inputs and the kept leaves are rolled to match, and the
            # first step's product is corrected from the last output to init.
            shift = 1 if layer.reverse else -1
            roll = lambda tree, by: jax.tree.map(lambda a: jnp.roll(a, by, axis=0), tree)
            x_rows = roll(xs, shift)
            leaves: list[Any] = [None] * len(init_leaves)
            for o, i in zip(kept_stacks, kept, strict=True):
                leaves[i] = roll(o, shift)
            leaves[k] = ys_res
            c_rows = jax.tree.unflatten(treedef, leaves)
            d_params, d_x_rows = products(matrices(x_rows), matrices(c_rows), matrices(dzs))
            d_xs = roll(jnp.reshape(d_x_rows, xs.shape), -shift)
            _, last, _ = first_last(n)
            x_f, c_last, dz_f = index(x_rows, last), index(c_rows, last), index(dzs, last)
            good, _ = products(x_f, init, dz_f)
            wrong, _ = products(x_f, c_last, dz_f)
            d_params = jax.tree.map(lambda a, g, w: a + (g - w), d_params, good, wrong)
        d_params = sp.add_elem_grads(d_params, d_pe)
        d_scales = None if scales is None else jnp.zeros_like(scales)
        return d_params, d_init, d_xs, d_scales

    block.defvjp(block_fwd, block_bwd)

    def run_block(params, carry, xs, scales):
        if xs.shape[0] == 0:  # nothing to keep: lax.scan's own (empty) gradient
            return forward(params, carry, xs)
        return block(params, carry, xs, scales)

    return run_block
