"""tf.distribute helpers for resume: strategies by name, the chief, logical CPUs.

Restoring under ``strategy.scope()`` creates mirrored variables; assigning a value in
cross-replica context writes it to every replica, so restored slots are identical on
all of them. Only the chief writes checkpoints.
"""
from __future__ import annotations

import os

from surgeon.core.tf import import_tf
from surgeon.core.errors import SurgeonError


def make_strategy(name: str):
    """``"default"``, ``"mirrored"`` or ``"multiworker"`` (configured by ``TF_CONFIG``).

    Make one per process and reuse it: two MirroredStrategy objects in one process reuse
    collective instance keys, and their all-reduces collide."""
    tf = import_tf()
    if name in ("default", "none", ""):
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(cpus)  # logical CPUs (see logical_cpus)
    if name in ("multiworker", "multi-worker"):
        if "TF_CONFIG" not in os.environ:
            raise SurgeonError("--strategy multiworker needs TF_CONFIG (cluster and task)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise SurgeonError(f"unknown strategy {name!r}; choose default, mirrored or multiworker")


def is_chief(strategy) -> bool:
    """True unless this process is a non-chief worker of a multi-worker cluster."""
    return bool(getattr(strategy.extended, "should_checkpoint", True))


def logical_cpus(n: int):
    """Split the CPU into ``n`` logical devices; call before TensorFlow initialises."""
    tf = import_tf()
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def replica_values(var):
    """Per-replica numpy values of a (possibly mirrored) Keras or TF variable."""
    v = var.value if hasattr(var, "value") else var
    if hasattr(v, "values"):
        return [x.numpy() for x in v.values]
    return [v.numpy()]
