"""Command-line interface: thin click commands over the library."""
from __future__ import annotations

import errno
import json
import sys

import click

from .errors import SurgeonError

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
def main():
    """surgeon: weight surgery on TensorFlow/Keras checkpoints, optimizer state included.

    \b
    Example:
      surgeon ls fixtures/cnn_adam.keras
    """


@main.command("ls")
@click.argument("checkpoint", type=click.Path())
@click.option("--model", type=click.Path(), default=None,
              help="For a bare .weights.h5: the .keras file or config.json it belongs to "
                   "(gives the trainable order needed to bind optimizer slots).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (stable contract).")
def ls_cmd(checkpoint, model, as_json):
    """List tensors, optimizer slots and totals.

    The tree of a checkpoint: layer -> weights (shape, dtype, values, bytes, role, the
    optimizer slots each param has), then the optimizer and totals. Reads no tensor data
    (only the iteration counter) and never imports TensorFlow for H5-based formats.

    \b
    Examples:
      surgeon ls fixtures/cnn_adam.keras
      surgeon ls fixtures/cnn_adam.weights.h5 --model fixtures/cnn_adam.keras --json
    """
    from .formats import open_checkpoint
    from .render import ls_json, ls_text

    with open_checkpoint(checkpoint, model=model) as ck:
        meta, entries = ck.metadata(), ck.entries()
    if as_json:
        click.echo(json.dumps(ls_json(meta, entries), indent=1))
    else:
        click.echo(ls_text(meta, entries))


def _register_commands():
    """Commands live in their own modules (surgeon/cli_*.py); each defines ``register(main)``."""
    import importlib
    import importlib.util
    for name in ("cli_apply", "cli_convert", "cli_diff", "cli_resume", "cli_tools"):
        if importlib.util.find_spec(f"surgeon.{name}") is not None:
            importlib.import_module(f"surgeon.{name}").register(main)


_register_commands()
