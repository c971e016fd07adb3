"""One process of tests/test_orbax.py's two-process Orbax checkpoint (jax.distributed on
127.0.0.1, CPU, gloo): ``save`` writes this process' shard of two arrays sharded across both
processes; ``restore`` reads them back onto the same sharding and checks this process' shards
(``w`` doubled: the test's edit). Usage: python orbax_two_process.py save|restore PORT ID PATH
"""
import os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
import numpy as np
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
mode, port, pid, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=60)
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("x",))
sh = NamedSharding(mesh, P("x"))
full = {"w": np.arange(64 * 32, dtype=np.float32).reshape(64, 32), "b": np.linspace(0, 1, 16).astype(np.float32)}
def glob(a):
    return jax.make_array_from_callback(a.shape, sh, lambda idx: a[idx])
if mode == "save":
    tree = {k: glob(v) for k, v in full.items()}
    with ocp.StandardCheckpointer() as c:
        c.save(path, tree)
    print("saved", pid, flush=True)
else:
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh) for k, v in full.items()}
    with ocp.StandardCheckpointer() as c:
        got = c.restore(path, abstract)
    for k, v in got.items():
        for s in v.addressable_shards:
            want = full[k][s.index] * (2 if k == "w" else 1)
            assert np.array_equal(np.asarray(s.data), want), (k, s.index)
    print("restored", pid, len(got), flush=True)
