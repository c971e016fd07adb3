"""CLI commands for structural surgery: widen, deepen, delete-channels, prune-channels,
insert-layer, delete-layer, replace-layer, delete-heads, prune-heads (thin wrappers over ``surgeon.structure``)."""
from __future__ import annotations

import functools
import json

import click

from surgeon.core.errors import SurgeonError

_SLOTS = click.Choice(["follow", "reset"])


def _refuse_early(f):
    """Check ``-o`` (given, not an input, named .keras) before planning, which may load
    TensorFlow (seconds): nothing is done first."""
    @functools.wraps(f)
    def guarded(**kw):
        if kw.get("dry_run"):
            return f(**kw)
        if not kw.get("output"):
            raise SurgeonError("-o/--output is required (or pass --dry-run)")
        from surgeon.core import atomic
        from surgeon.formats import check_output_name
        atomic.check_output(kw["output"], [kw["model"]])
        check_output_name(kw["output"], "keras", what=f"{f.__name__[:-4].replace('_', '-')} "
                          "writes a Keras model (.keras)")
        return f(**kw)
    return guarded


def _common(f):
    f = _refuse_early(f)
    f = click.option("--json", "as_json", is_flag=True,
                     help="Print the plan (and the result) as one JSON object.")(f)
    f = click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")(f)
    f = click.option("--slots", type=_SLOTS, default="follow", show_default=True,
                     help="Optimizer slots of touched tensors: follow (same index map; "
                          "rescaled consistently, new tensors zero) or reset (zero).")(f)
    f = click.option("-o", "--output", type=click.Path(), default=None,
                     help="Output .keras file (required unless --dry-run).")(f)
    return click.argument("model", type=click.Path())(f)


def _pruning(noun, by_help):
    """``--fraction`` and ``--by`` of the prune-* commands (``noun``: what goes)."""
    def add(f):
        f = click.option("--by", type=click.Choice(["l1", "l2"]), default="l1", show_default=True,
                         help=by_help)(f)
        return click.option("--fraction", type=float, required=True,
                            help=f"Fraction of {noun} to remove.")(f)
    return add


_MHA_LAYER = click.option("--layer", required=True, help="MultiHeadAttention layer.")


def _run(plan, output, dry_run, as_json):
    from surgeon import structure
    if not dry_run and not output:
        raise SurgeonError("-o/--output is required (or pass --dry-run)")
    result = None if dry_run else structure.execute(plan, output)
    if as_json:
        click.echo(json.dumps({"plan": plan.to_json(), "result": result}, indent=1))
        return
    click.echo(plan.text())
    if result:
        click.echo(f"wrote {result['output']}: {result['copied']} tensors copied, "
                   f"{result['transformed']} transformed, {result['new']} new, "
                   f"{result['slots']} slots written")


def _spec(text):
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise SurgeonError(f"--layer-json is not valid JSON: {exc}") from None
    if isinstance(spec, str):
        spec = {"class_name": spec, "config": {}}
    return spec


@click.command("widen")
@_common
@click.option("--layer", required=True,
              help="Layer to widen (Dense, Conv, Conv*Transpose, SeparableConv, Embedding, "
                   "LSTM/GRU/SimpleRNN, Bidirectional).")
@click.option("--to", "to", type=int, required=True, help="New number of units/filters.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which units are replicated.")
@click.option("--noise", type=float, default=0.0, show_default=True,
              help="Relative std of noise added to the new units (breaks symmetry; the function "
                   "is then only approximately preserved).")
def widen_cmd(model, output, slots, dry_run, as_json, layer, to, seed, noise):
    """Net2WiderNet: grow a Dense/Conv layer.

    The widened model computes the same function. New units replicate randomly chosen
    existing ones; the next layers' incoming weights are divided by each unit's
    replication count; BatchNorm in between follows. Slots (follow): replicated units'
    slots / count (second moments / count^2); consumer rows copied.

    \b
    Example:
      surgeon widen fixtures/structure/mlp_adam.keras --layer fc1 --to 16 -o wide.keras
    """
    from surgeon.structure import plan_widen
    _run(plan_widen(model, layer, to, seed=seed, noise=noise, slots=slots), output, dry_run, as_json)


@click.command("deepen")
@_common
@click.option("--after", required=True, help="Layer after which to insert the identity layer.")
@click.option("--activation", type=click.Choice(["auto", "relu", "linear"]), default="auto",
              show_default=True, help="auto: relu when the input is non-negative, else linear.")
@click.option("--kernel-size", type=int, default=3, show_default=True, help="For Conv layers.")
@click.option("--name", default=None, help="Name of the new layer (default AFTER_deep).")
def deepen_cmd(model, output, slots, dry_run, as_json, after, activation, kernel_size, name):
    """Net2DeeperNet: insert an identity layer.

    An identity-initialised Dense/Conv layer after AFTER (same function). The output
    layer itself cannot be deepened (the new layer would become the model's output).

    \b
    Example:
      surgeon deepen fixtures/structure/convbn_sgdm.keras --after relu1 -o deep.keras
    """
    from surgeon.structure import plan_deepen
    _run(plan_deepen(model, after, activation=activation, kernel_size=kernel_size, name=name,
                     slots=slots), output, dry_run, as_json)


def _channels(text, option="--channels"):
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise SurgeonError(f"{option} {text!r}: expected comma-separated integers like 0,3") from None


@click.command("delete-channels")
@_common
@click.option("--layer", required=True,
              help="Layer whose output channels go (the producers widen accepts).")
@click.option("--channels", required=True, help="Comma-separated channel indices, e.g. 0,3.")
def delete_channels_cmd(model, output, slots, dry_run, as_json, layer, channels):
    """Delete channels and their downstream inputs.

    Units/filters go, with the matching inputs of every downstream consumer (through
    BatchNorm, Flatten, Concatenate, and Add when all branches can follow).

    \b
    Example:
      surgeon delete-channels fixtures/structure/residual_rms.keras --layer c2 --channels 0,3 -o small.keras
    """
    from surgeon.structure import plan_delete_channels
    _run(plan_delete_channels(model, layer, _channels(channels), slots=slots), output, dry_run, as_json)


@click.command("prune-channels")
@_common
@click.option("--layer", required=True, help="Layer to prune (the producers widen accepts).")
@_pruning("channels", "Channel score: norm of its kernel slice; the smallest go.")
def prune_channels_cmd(model, output, slots, dry_run, as_json, layer, fraction, by):
    """Delete a layer's weakest channels.

    The channels with the smallest kernel norm go, as with delete-channels.

    \b
    Example:
      surgeon prune-channels fixtures/structure/convbn_sgdm.keras --layer conv2 --fraction 0.25 -o pruned.keras
    """
    from surgeon.structure import plan_prune_channels
    _run(plan_prune_channels(model, layer, fraction, by=by, slots=slots), output, dry_run, as_json)


@click.command("delete-layer")
@_common
@click.option("--layer", required=True, help="Single-input layer to remove.")
def delete_layer_cmd(model, output, slots, dry_run, as_json, layer):
    """Remove a layer; its consumers take its input.

    Other layers keep their weights and slots.

    \b
    Example:
      surgeon delete-layer deep.keras --layer relu1_deep -o back.keras
    """
    from surgeon.structure import plan_delete_layer
    _run(plan_delete_layer(model, layer, slots=slots), output, dry_run, as_json)


@click.command("insert-layer")
@_common
@click.option("--after", required=True, help="Layer whose output feeds the new layer.")
@click.option("--layer-json", required=True,
              help='Built-in Keras layer: {"class_name": "Dropout", "config": {"rate": 0.1}}.')
@click.option("--name", default=None,
              help="Name of the new layer (default: config.name, else a fresh Keras-style name "
                   "such as dropout or dense_1 that no layer of the model has).")
def insert_layer_cmd(model, output, slots, dry_run, as_json, after, layer_json, name):
    """Insert a built-in Keras layer after another.

    New weights get Keras' initialisers and zero slots. Without --name (or config.name)
    the layer gets a fresh Keras-style name (dropout, dense_1, ...).

    \b
    Example:
      surgeon insert-layer fixtures/structure/mlp_adam.keras --after fc1 \\
          --layer-json '{"class_name": "Dropout", "config": {"rate": 0.1}}' --name drop -o d.keras
    """
    from surgeon.structure import plan_insert_layer
    _run(plan_insert_layer(model, after, _spec(layer_json), name=name, slots=slots),
         output, dry_run, as_json)


@click.command("replace-layer")
@_common
@click.option("--layer", required=True, help="Layer to replace.")
@click.option("--layer-json", required=True, help="Built-in Keras layer spec (class_name, config).")
@click.option("--name", default=None, help="Name of the new layer (default: the old name).")
def replace_layer_cmd(model, output, slots, dry_run, as_json, layer, layer_json, name):
    """Replace a layer, keeping weights that fit.

    Weights of the same name and shape (and their slots) are kept.

    \b
    Example:
      surgeon replace-layer fixtures/structure/mlp_adam.keras --layer fc2 \\
          --layer-json '{"class_name": "Dense", "config": {"units": 8, "activation": "tanh"}}' -o r.keras
    """
    from surgeon.structure import plan_replace_layer
    _run(plan_replace_layer(model, layer, _spec(layer_json), name=name, slots=slots),
         output, dry_run, as_json)


@click.command("delete-heads")
@_common
@_MHA_LAYER
@click.option("--heads", required=True, help="Comma-separated head indices, e.g. 0,2.")
def delete_heads_cmd(model, output, slots, dry_run, as_json, layer, heads):
    """Delete MultiHeadAttention heads.

    The heads' query/key/value slices and output-projection rows go (slots alike); the
    layer's output shape is unchanged.

    \b
    Example:
      surgeon delete-heads model.keras --layer mha --heads 0,2 -o fewer_heads.keras
    """
    from surgeon.structure import plan_delete_heads
    _run(plan_delete_heads(model, layer, _channels(heads, "--heads"), slots=slots),
         output, dry_run, as_json)


@click.command("prune-heads")
@_common
@_MHA_LAYER
@_pruning("heads", "Head score: norm of its query/key/value kernels and output rows.")
def prune_heads_cmd(model, output, slots, dry_run, as_json, layer, fraction, by):
    """Delete the weakest attention heads.

    The heads with the smallest weight norm go, as with delete-heads.

    \b
    Example:
      surgeon prune-heads model.keras --layer mha --fraction 0.25 -o pruned.keras
    """
    from surgeon.structure import plan_prune_heads
    _run(plan_prune_heads(model, layer, fraction, by=by, slots=slots), output, dry_run, as_json)


COMMANDS = (widen_cmd, deepen_cmd, delete_channels_cmd, prune_channels_cmd, delete_layer_cmd,
            insert_layer_cmd, replace_layer_cmd, delete_heads_cmd, prune_heads_cmd)


def register(main):
    for cmd in COMMANDS:
        main.add_command(cmd)
