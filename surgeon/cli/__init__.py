"""cli: the command line -- the click group ``main`` and the error mapping (a ``SurgeonError``
or an environment ``OSError`` becomes one ``surgeon: error: ...`` line and exit 2) live here;
each command group is a module of its own mirroring a library package (``inspect``: ls, diff,
audit; ``recipe``: apply, transplant, log; ``convert``; ``structure``: widen, deepen, ...;
``train``: resume). Each command parses arguments, calls one library function and renders
the result. May import every library package; nothing imports the cli.
"""
from __future__ import annotations

import errno
import json
import os
import sys

import click

from surgeon.core.tf import VERBOSE_ENV
from surgeon.core.errors import SurgeonError

# OSErrors that are the environment's answer, not a bug: one line, exit 2.
_ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
               errno.EIO}


class _Group(click.Group):
    """Turns SurgeonError (and damaged-file errors) into one line on stderr, exit 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SurgeonError as exc:
            click.echo(f"surgeon: error: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:  # the environment refused a write (disk full, read-only, ...)
            if exc.errno not in _ENV_ERRNOS:
                raise
            target = exc.filename2 or exc.filename  # copy errors: filename2 is the destination
            where = f"{target}: " if target else ""
            click.echo(f"surgeon: error: {where}{exc.strerror}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("surgeon: interrupted; nothing was written", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="surgeon")
@click.option("--verbose", is_flag=True,
              help="Show TensorFlow's own start-up and log lines (hidden by default).")
def main(verbose):
    """surgeon: weight surgery on TensorFlow/Keras checkpoints, optimizer state included.

    \b
    Example:
      surgeon ls fixtures/cnn_adam.keras
    """
    if verbose:
        os.environ[VERBOSE_ENV] = "1"


# one module per command group, mirroring the library's packages
GROUPS = ("inspect", "recipe", "convert", "structure", "train", "merge")


def _register_commands():
    """Commands live in their own modules (surgeon/cli/<group>.py); each defines ``register(main)``."""
    import importlib
    import importlib.util
    for name in GROUPS:
        if importlib.util.find_spec(f"surgeon.cli.{name}") is not None:
            importlib.import_module(f"surgeon.cli.{name}").register(main)


_register_commands()
