"""One process of tests/test_orbax.py's two-process Orbax checkpoint (jax.distributed on
127.0.0.1, CPU, gloo). It saves this process' shard of two arrays sharded across both
processes to SRC, prints ``saved ID``, waits for the file ``GO`` (the test edits SRC into
OUT meanwhile), then restores OUT onto the same sharding and checks this process' shards
(``w`` doubled: the test's edit). Usage: python orbax_two_process.py PORT ID SRC OUT GO
"""
import os
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"
import numpy as np  # noqa: E402
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, src, out, go = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid, initialization_timeout=120)
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

mesh = Mesh(np.array(jax.devices()), ("x",))
sh = NamedSharding(mesh, P("x"))
# 4 KB per shard: stored in ocdbt.process_N (values up to 1 KB are inlined in the manifest)
full = {"w": np.arange(64 * 32, dtype=np.float32).reshape(64, 32),
        "b": np.linspace(0, 1, 16).astype(np.float32)}
tree = {k: jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: v[idx]) for k, v in full.items()}
with ocp.StandardCheckpointer() as c:
    c.save(src, tree)
print("saved", pid, flush=True)
deadline = time.monotonic() + 180
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit("no GO file")
    time.sleep(0.05)
abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh) for k, v in full.items()}
with ocp.StandardCheckpointer() as c:
    got = c.restore(out, abstract)
for k, v in got.items():
    for s in v.addressable_shards:
        want = full[k][s.index] * (2 if k == "w" else 1)
        assert np.array_equal(np.asarray(s.data), want), (k, s.index)
print("restored", pid, flush=True)
