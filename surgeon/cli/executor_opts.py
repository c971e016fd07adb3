"""The ``--executor/--workers/--address`` options of ``surgeon merge`` and ``surgeon convert``
(as ``surgeon apply``'s), and the executor they name."""
from __future__ import annotations

import click


def executor_options(what):
    """Decorator adding the three options; ``what`` says which outputs pool/Ray write."""
    def deco(fn):
        fn = click.option("--address", default=None,
                          help="ray: the cluster to join (default: RAY_ADDRESS or a local one).")(fn)
        fn = click.option("--workers", type=int, default=None,
                          help="pool: processes (default: the cores); ray: concurrent shard tasks.")(fn)
        return click.option("--executor", type=click.Choice(["local", "pool", "ray"]), default="local",
                            show_default=True,
                            help=f"Who computes the output: this process, a local process pool, or a "
                                 f"Ray cluster; {what}. The output is the same.")(fn)
    return deco


def make(executor, workers, address):
    """The executor (``surgeon.recipe.executors.make_executor``); one line if Ray is missing."""
    from surgeon.recipe.executors import make_executor
    return make_executor(executor, workers, address)
