"""One process of the multi-process check (``tests/test_distributed.py``), or its reference.

    python tests/_distributed_worker.py single OUT
    python tests/_distributed_worker.py dist PROCESS_ID NUM_PROCESSES PORT OUT

``single``: the gradient of the character language model's loss
(``experiments.tasks.char_lm.CharModel``, GRU) over a batch of 8 sequences, on one
device. ``dist``: the same gradient, data-parallel: every process calls
``jax.distributed.initialize`` and holds 2 simulated CPU devices and its
share of the batch; the batch is sharded over all the processes' devices and
the parameters are replicated. Process 0 writes the gradient to ``OUT``
(``.npz``). On a multi-GPU node or a TPU slice the same code runs with one
process per host and the coordinator's address in place of ``localhost``
(on Cloud TPU, ``jax.distributed.initialize()`` finds it by itself).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICES_PER_PROCESS = 2
BATCH, T, VOCAB, HIDDEN = 8, 11, 7, 5


def main(argv: list[str]) -> None:
    mode = argv[0]
    os.environ["JAX_PLATFORMS"] = "cpu"
    if mode == "dist":
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    import jax

    if mode == "dist":
        pid, n, port, out = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{port}", num_processes=n, process_id=pid)
    else:
        pid, n, out = 0, 1, argv[1]

    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    import bpttjax as bj
    from experiments.tasks.char_lm import CharModel

    model = CharModel("gru", vocab=VOCAB, hidden=HIDDEN)
    params = model.init(jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(BATCH, T + 1))
    X, Y = tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32)

    def loss(params, carry, X, Y):
        return model.loss(params, carry, X, Y, remat=bj.Nested(2))[0]

    grad = jax.jit(jax.grad(loss))
    carry = np.asarray(model.initial_carry(BATCH))
    if mode == "single":
        g = grad(params, jnp.asarray(carry), jnp.asarray(X), jnp.asarray(Y))
    else:
        mesh = jax.make_mesh(
            (jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
        )
        rows = NamedSharding(mesh, P("data"))
        share = BATCH // n
        mine = slice(pid * share, (pid + 1) * share)

        def local(a):
            return jax.make_array_from_process_local_data(rows, a[mine], a.shape)

        params = jax.device_put(params, NamedSharding(mesh, P()))
        g = grad(params, local(carry), local(X), local(Y))
        assert g["W_out"].sharding.is_fully_replicated
    leaves = {
        jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf))
        for path, leaf in jax.tree_util.tree_leaves_with_path(g)
    }
    if pid == 0:
        np.savez(out, **leaves)
    if mode == "dist":
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
