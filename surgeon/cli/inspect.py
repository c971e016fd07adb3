"""CLI commands ``surgeon ls``, ``surgeon diff`` and ``surgeon audit`` (thin wrappers over
surgeon.inspect: render, diff, series, audit, report)."""
from __future__ import annotations

import json
import sys

import click

from surgeon.core.errors import SurgeonError
from surgeon.formats import STEP_HELP


def _size(text):
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, IndexError):
        raise SurgeonError(f"--chunk {text!r}: expected a size like 8M, 512K or 1G") from None


@click.command("ls")
@click.argument("checkpoint", type=click.Path())
@click.option("--model", type=click.Path(), default=None,
              help="For a bare .weights.h5: the .keras file or config.json it belongs to "
                   "(gives the trainable order needed to bind optimizer slots).")
@click.option("--step", type=int, default=None,
              help="For an Orbax root of numbered steps: the step to list (default: the latest).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (stable contract).")
def ls_cmd(checkpoint, model, step, as_json):
    """List tensors, optimizer slots and totals.

    The tree of a checkpoint: layer -> weights (shape, dtype, values, bytes, role, the
    optimizer slots each param has), then the optimizer and totals. Reads no tensor data
    (only the iteration counter) and never imports TensorFlow for H5-based formats.

    \b
    Examples:
      surgeon ls fixtures/cnn_adam.keras
      surgeon ls fixtures/cnn_adam.weights.h5 --model fixtures/cnn_adam.keras --json
      surgeon ls run/orbax_ckpt --step 40
    """
    from surgeon.formats import open_checkpoint
    from surgeon.inspect.render import ls_json, ls_text

    with open_checkpoint(checkpoint, model=model, step=step) as ck:
        meta, entries = ck.metadata(), ck.entries()
    if as_json:
        click.echo(json.dumps(ls_json(meta, entries), indent=1))
    else:
        click.echo(ls_text(meta, entries))


def _plotted(path):
    """Say where the PNG went (stderr, so --json and --markdown stay clean on stdout)."""
    from surgeon.inspect.report import PLOT_SIZE
    click.echo(f"surgeon: wrote plot {path} ({PLOT_SIZE[0]}x{PLOT_SIZE[1]} px)", err=True)


@click.command("diff")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--model", type=click.Path(), default=None,
              help="For bare .weights.h5 files: the .keras or config.json giving the structure "
                   "(used for A and B; .keras files ignore it).")
@click.option("--model-b", type=click.Path(), default=None, help="A different --model for B.")
@click.option("--atol", type=float, default=0.0, show_default=True,
              help="Absolute tolerance: an element differs when |B-A| > atol + rtol*|A|.")
@click.option("--rtol", type=float, default=0.0, show_default=True, help="Relative tolerance.")
@click.option("--only", "only", default=None, metavar="GLOB",
              help="Compare only names matching GLOB (slots follow their param), e.g. 'conv1/*'.")
@click.option("--ignore-optimizer", is_flag=True, help="Skip optimizer slots, iteration and learning rate.")
@click.option("--map", "maps", multiple=True, metavar="REGEX=REPL",
              help="Rename A's tensors before pairing (repeatable), e.g. '^dense_1/=fc/'.")
@click.option("--series", is_flag=True,
              help="CHECKPOINTS is a run (files or one directory): per-layer drift from the first.")
@click.option("--all", "show_all", is_flag=True, help="Also list equal tensors in the table.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (stable contract).")
@click.option("--markdown", is_flag=True, help="Print a markdown report (pull requests, model cards).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, metavar="FILE.png",
              help="Also draw a PNG (per-layer change + histogram; a line chart with --series). "
                   "Needs matplotlib: pip install 'surgeon[plot]'.")
@click.option("--chunk", default="2M", show_default=True, help="Bytes read per chunk (bounds memory).")
@click.option("--step", type=int, default=None, help=STEP_HELP)
def diff_cmd(checkpoints, model, model_b, atol, rtol, only, ignore_optimizer, maps, series, show_all,
             as_json, markdown, plot, chunk, step):
    """Compare two checkpoints tensor by tensor.

    Any two formats, paired by canonical name. Per tensor: status (equal, changed,
    reshaped, retyped, added, removed), max |B-A|, relative L2 change |B-A|/|A|, cosine,
    fraction of elements changed, norms. A param
    that changed while its optimizer slots did not (or the reverse) is flagged.
    Exit code: 0 equal within tolerance, 1 different, 2 error.

    \b
    Examples:
      surgeon diff fixtures/cnn_adam.keras edited.keras
      surgeon diff fixtures/cnn_adam.keras fixtures/cnn_adam.weights.h5 --model fixtures/cnn_adam.keras
      surgeon diff a.keras b.keras --atol 1e-6 --only 'conv*' --json
      surgeon diff a.keras b.keras --markdown --plot change.png
      surgeon diff --series ckpt/epoch1.keras ckpt/epoch2.keras ckpt/epoch3.keras --plot drift.png
      surgeon diff model.keras run/orbax_ckpt --step 40
    """
    from surgeon.formats import select_step
    with select_step([] if series else checkpoints, step):
        _diff(checkpoints, model, model_b, atol, rtol, only, ignore_optimizer, maps, series, show_all,
              as_json, markdown, plot, chunk)


def _diff(checkpoints, model, model_b, atol, rtol, only, ignore_optimizer, maps, series, show_all,
          as_json, markdown, plot, chunk):
    from surgeon.core import atomic
    from surgeon.formats import detect
    from surgeon.inspect import diff, report
    if plot:  # the plot is an output: never one of the inputs
        atomic.check_output(plot, [*checkpoints, model, model_b])
    chunk_bytes = _size(chunk)
    if series:
        from surgeon.inspect.series import diff_series
        res = diff_series(checkpoints, model=model, only=only, chunk_bytes=chunk_bytes)
        if plot:
            _plotted(report.plot_series(res, plot))
        out = (json.dumps(res.to_json(), indent=1) if as_json
               else report.series_markdown(res) if markdown else report.series_text(res))
        click.echo(out)
        return
    if len(checkpoints) != 2:
        raise SurgeonError(f"diff takes 2 checkpoints (A B), got {len(checkpoints)}; "
                           "use --series for a run of checkpoints")
    for path in checkpoints:  # both found before one is opened (a TF checkpoint loads TF)
        detect(path)
    res = diff.diff_paths(*checkpoints, model=model, model_b=model_b, atol=atol, rtol=rtol, only=only,
                          ignore_optimizer=ignore_optimizer, maps=maps, chunk_bytes=chunk_bytes,
                          sample=diff.SAMPLE_PER_TENSOR if plot else 0)
    if plot:
        _plotted(report.plot_diff(res, plot))
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=1))
    elif markdown:
        click.echo(report.diff_markdown(res, show_all))
    else:
        click.echo(report.diff_text(res, show_all))
    sys.exit(0 if res.equal else 1)


@click.command("audit")
@click.argument("checkpoint", type=click.Path())
@click.option("--model", type=click.Path(), default=None,
              help="For a bare .weights.h5: the .keras or config.json it belongs to (binds slots).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (stable contract).")
@click.option("--iteration-threshold", type=int, default=None,
              help="Report all-zero second moments from this iteration on. Default: when the "
                   "first update after them would be >= 2x a settled step (Adam-like optimizers, "
                   "from the stored betas and iteration; the rule apply warns by), else from 100.")
@click.option("--norm-threshold", type=float, default=100.0, show_default=True,
              help="Report kernels with RMS x sqrt(fan-in) above this.")
@click.option("--chunk", default="2M", show_default=True, help="Bytes read per chunk (bounds memory).")
@click.option("--step", type=int, default=None, help=STEP_HELP)
def audit_cmd(checkpoint, model, as_json, iteration_threshold, norm_threshold, chunk, step):
    """Check a checkpoint's health.

    NaN/Inf, zero/constant/dead/exploding kernels, optimizer slots missing, extra or
    mismatched, masked weights with moments, second moments reset at a large iteration,
    mixed dtypes.

    Findings have a severity (error, warning, info) and a code. Exit code: 1 when any
    finding is an error, 0 otherwise, 2 when the file cannot be read.

    \b
    Examples:
      surgeon audit fixtures/cnn_adam.keras
      surgeon audit fixtures/cnn_adam.weights.h5 --model fixtures/cnn_adam.keras --json
    """
    from surgeon.formats import select_step
    from surgeon.inspect import audit, report
    with select_step([checkpoint], step):
        res = audit.audit_path(checkpoint, model=model, chunk_bytes=_size(chunk),
                               iteration_threshold=iteration_threshold, norm_threshold=norm_threshold)
    click.echo(json.dumps(res.to_json(), indent=1) if as_json else report.audit_text(res))
    sys.exit(0 if res.ok else 1)


def register(main):
    main.add_command(ls_cmd)
    main.add_command(diff_cmd)
    main.add_command(audit_cmd)
