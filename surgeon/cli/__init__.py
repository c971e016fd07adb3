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

from surgeon.core.tf import VERBOSE_ENV, request_light_keras
from surgeon.core.errors import SurgeonError

# OSErrors that are the environment's answer, not a bug: one line, exit 2.
_ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
               errno.EIO}


# command -> the module of surgeon.cli defining it: running one command imports only its
# own module (start-up time); a command missing here is found by importing every module.
LAZY = {"ls": "inspect", "diff": "inspect", "audit": "inspect", "apply": "recipe",
        "transplant": "recipe", "log": "recipe", "convert": "convert", "resume": "train",
        "merge": "merge", "lora": "merge"}


class _Group(click.Group):
    """Turns SurgeonError (and damaged-file errors) into one line on stderr, exit 2.

    Commands are registered lazily: ``get_command`` imports only the module of the
    command asked for; ``commands`` (help, listing, tests) has every command."""

    @property
    def commands(self):
        if not getattr(self, "_all_loaded", False):
            self._all_loaded = True
            _register_commands()
        return self._commands

    @commands.setter
    def commands(self, value):
        self._commands = value

    def add_command(self, cmd, name=None):
        self._commands[name or cmd.name] = cmd

    def get_command(self, ctx, cmd_name):
        if cmd_name not in self._commands:
            _register_commands(LAZY.get(cmd_name))
        if cmd_name not in self._commands:  # not where LAZY says: look everywhere
            _register_commands()
        return self._commands.get(cmd_name)

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
@click.option("--import", "imports", multiple=True, metavar="MODULE",
              help="Import MODULE (a module name or a .py path; repeatable) before the command: "
                   "the Keras classes it registers (custom layers, subclassed models) give their "
                   "variables Keras' names. Runs its code; loads Keras on TensorFlow first.")
def main(verbose, imports):
    """surgeon: weight surgery on TensorFlow/Keras checkpoints, optimizer state included.

    \b
    Example:
      surgeon ls fixtures/cnn_adam.keras
      surgeon --import my_layers.py ls subclassed.keras   # custom classes named as in Keras
    """
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    if imports:
        _import_user_modules(imports)
    else:
        request_light_keras()  # commands that only build configs never load TensorFlow


def _import_user_modules(specs):
    """``--import``: Keras first (on TensorFlow, quietly, with surgeon's settings: the user's
    ``import keras`` gets this one), then each module once. A module that fails to import
    is a ``SurgeonError``: one line, exit 2 (``_Group.invoke``)."""
    from surgeon.core import usermod
    from surgeon.core.tf import import_keras
    import_keras()
    for spec in specs:
        usermod.import_module(spec, "--import")


# one module per command group, mirroring the library's packages
GROUPS = ("inspect", "recipe", "convert", "structure", "train", "merge")


_registered = set()


def _register_commands(only=None):
    """Commands live in their own modules (surgeon/cli/<group>.py); each defines
    ``register(main)``. ``only``: just that module (None: every one)."""
    import importlib
    import importlib.util
    for name in GROUPS if only is None else (only,):
        if name not in _registered and importlib.util.find_spec(f"surgeon.cli.{name}") is not None:
            _registered.add(name)
            importlib.import_module(f"surgeon.cli.{name}").register(main)


def run():
    """``python -m surgeon``: ``main``, then a quick exit once it has finished.

    Tearing the interpreter down (freeing every module of numpy, h5py, ...) costs ~0.05-0.2 s
    of a short command; the command's work is complete by then (outputs renamed into place
    and fsynced, journals removed). So: flush stdout and stderr, run the ``atexit``
    handlers, and end the process with ``os._exit``. Only from the main thread alone (a
    live Python thread gets the normal exit, which joins it). Before: the first ``import
    h5py`` is told to run no ``uname -p`` child (``surgeon.core.startup``)."""
    from surgeon.core import startup
    startup.install()
    try:
        main(prog_name="surgeon")
        code = 0
    except SystemExit as exc:
        code = exc.code
        if not (code is None or isinstance(code, int)):
            raise
    import threading
    if threading.active_count() > 1:
        sys.exit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # e.g. a closed pipe: let the normal exit report it
        sys.exit(code)
    import atexit
    atexit._run_exitfuncs()
    os._exit(code or 0)
