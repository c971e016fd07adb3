"""``surgeon resume``: keep training a (possibly edited) checkpoint, optimizer state exact."""
from __future__ import annotations

import json
import sys

import click

from surgeon.core.tf import import_tf
from surgeon.formats import STEP_HELP


def _progress(total, enabled):
    state = {"bar": None}

    def on_step(i, n, loss):
        if not enabled:
            return
        if state["bar"] is None:
            state["bar"] = click.progressbar(length=n, label="training", file=click.get_text_stream("stderr"))
            state["bar"].__enter__()
        state["bar"].update(1)
        if i == n:
            state["bar"].__exit__(None, None, None)

    return on_step


def _summary(res) -> str:
    rep = res.report
    lines = [f"restored {rep['restored']} tensors (weights, optimizer slots, iteration, "
             f"learning rate); iteration {res.iteration_start} -> {res.iteration_end}",
             f"trained {res.steps} steps in {res.seconds:.2f}s"
             + (f" ({res.steps / res.seconds:.1f} steps/s)" if res.seconds else "")
             + (f", {res.replicas} replicas" if res.replicas > 1 else ""),
             f"final loss {res.loss:.6g}" if res.loss is not None else "no steps run"]
    if res.masks:
        lines.append(f"pruning masks honoured: {len(res.masks)} tensor(s)")
    for note in rep.get("notes", []):
        lines.append(f"note: {note}")
    if res.checkpoints:
        how = "surgeon writer, same format as input" if res.writer == "surgeon" else "Keras saver"
        lines.append(f"checkpoint: {res.checkpoints[-1]} ({how}; written {len(res.checkpoints)} "
                     "time(s), atomically)")
    return "\n".join(lines)


@click.command("resume")
@click.argument("checkpoint", type=click.Path())
@click.option("--data", "data", required=True,
              help="MODULE:FUNCTION returning a tf.data.Dataset of batches or (x, y) arrays; "
                   "MODULE may be a path to a .py file.")
@click.option("--steps", type=click.IntRange(min=0), required=True, help="Optimizer steps to run.")
@click.option("-o", "--output", type=click.Path(), required=True,
              help="Checkpoint to write (same format as the input, atomic); "
                   "'{iteration}' in the name keeps one file per save.")
@click.option("--model", default=None,
              help="MODEL.keras, config.json or MODULE:FUNCTION (compiled model) when the "
                   "checkpoint has no config of its own.")
@click.option("--every", type=click.IntRange(min=1), default=None,
              help="Also write the output every K steps (a kill leaves the last one intact).")
@click.option("--seed", type=int, default=None, help="Random seed (fresh weights, dropout, data).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Batch size when the data function returns arrays.")
@click.option("--allow-missing", is_flag=True,
              help="Keep fresh values for weights the checkpoint lacks; ignore extra tensors.")
@click.option("--reset-optimizer", is_flag=True,
              help="Do not restore optimizer state: slots start from zero.")
@click.option("--strategy", type=click.Choice(["default", "mirrored", "multiworker"]),
              default="default", help="tf.distribute strategy (multiworker reads TF_CONFIG).")
@click.option("--deterministic", is_flag=True, help="Enable TensorFlow op determinism.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--step", type=int, default=None, help=STEP_HELP)
def resume_cmd(checkpoint, data, steps, output, model, every, seed, batch_size, allow_missing,
               reset_optimizer, strategy, deterministic, as_json, step):
    """Keep training with exact optimizer state.

    Weights AND optimizer state are restored by canonical name, then training continues.
    Every weight, optimizer slot, the iteration counter and the learning rate are
    restored (not by Keras' positional loader). A checkpoint that does not fit the model
    is reported in full and nothing runs (exit 2). The data stream skips the batches the
    iteration counter says were consumed, so an interrupted run continues exactly.

    \b
    Example:
      surgeon resume fixtures/cnn_adam.keras \\
          --data recipes/example_data.py:cnn_data --steps 20 -o /tmp/cnn_more.keras
      surgeon resume fixtures/nested_adamw.weights.h5 --model fixtures/nested_adamw.keras \\
          --data recipes/example_data.py:nested_data --steps 5 -o /tmp/n.weights.h5 --json
    """
    from surgeon.formats import select_step
    with select_step([checkpoint], step):
        _resume(checkpoint, data, steps, output, model, every, seed, batch_size, allow_missing,
                reset_optimizer, strategy, deterministic, as_json)


def _resume(checkpoint, data, steps, output, model, every, seed, batch_size, allow_missing,
            reset_optimizer, strategy, deterministic, as_json):
    from surgeon.train import resume
    from surgeon.train.loop import check_arguments
    check_arguments(checkpoint, data, steps, output, model)  # before TensorFlow loads
    if deterministic:
        import_tf().config.experimental.enable_op_determinism()
    from surgeon.train import FitError
    try:
        res = resume(checkpoint, data=data, steps=steps, output=output, model=model,
                     every=every, seed=seed, batch_size=batch_size, allow_missing=allow_missing,
                     reset_optimizer=reset_optimizer, strategy=strategy,
                     on_step=_progress(steps, not as_json and steps > 0))
    except FitError as exc:
        _report_misfit(exc.report, as_json)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        saved = getattr(exc, "surgeon_checkpoints", [])
        last = f"last complete checkpoint: {saved[-1]}" if saved else "nothing was written"
        click.echo(f"\nsurgeon: interrupted; {last}", err=True)
        sys.exit(130)
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=1))
    else:
        click.echo(_summary(res))


def _report_misfit(rep, as_json):
    """Every problem on its own line (stderr), or the report as JSON; nothing was run."""
    if as_json:
        click.echo(json.dumps({"error": "checkpoint does not fit the model",
                               "restore": rep.to_json()}, indent=1))
    probs = rep.problems()
    click.echo(f"surgeon: error: checkpoint does not fit the model: {len(probs)} problem(s); "
               "no step was run, nothing was written", err=True)
    for p in probs:
        click.echo(f"  {p}", err=True)
    click.echo("  (--allow-missing keeps fresh values for missing tensors and ignores extra "
               "ones; --reset-optimizer starts the optimizer from zero)", err=True)


def register(main):
    main.add_command(resume_cmd)
