"""CLI: ``surgeon merge`` (model merging) and ``surgeon lora`` (LoRA merge and extract)."""
from __future__ import annotations

import json
import sys

import click

from surgeon.cli.executor_opts import executor_options, make


def _weights(values):
    """``--weight 0.3 --weight 0.7`` or ``--weight 0.3,0.7`` -> [0.3, 0.7] (None if absent)."""
    out = []
    for v in values:
        for part in str(v).split(","):
            try:
                out.append(float(part))
            except ValueError:
                raise click.BadParameter(f"{part!r} is not a number") from None
    if not out:
        return None
    return out if len(out) > 1 else out[0]


@click.command("merge")
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", default=None, help="The merged checkpoint (the template's format).")
@click.option("--base", default=None, type=click.Path(),
              help="The model the others were fine-tuned from (task_arithmetic, ties, dare, model_stock).")
@click.option("--method", type=click.Choice(["linear", "task_arithmetic", "ties", "dare", "slerp",
                                             "model_stock"]), default="linear", show_default=True)
@click.option("--weight", "weight", multiple=True, metavar="W[,W...]",
              help="Per-model weight: one value, or one per model (repeat or comma-separate).")
@click.option("--density", "density", multiple=True, metavar="D[,D...]",
              help="ties: fraction of each task vector kept (one, or one per model).")
@click.option("--p", "drop", multiple=True, metavar="P[,P...]",
              help="dare: drop probability (one, or one per model).")
@click.option("--scale", type=float, default=None, help="λ, the merged task vector's scale.")
@click.option("--t", "t", type=float, default=None, help="slerp: interpolation 0..1 (0: first model).")
@click.option("--normalize/--no-normalize", default=None, help="linear: divide by the weights' sum.")
@click.option("--combine", type=click.Choice(["linear", "ties"]), default=None, help="dare: how to combine.")
@click.option("--seed", type=int, default=None, help="dare: random seed.")
@click.option("--set", "sets", multiple=True, metavar="PATTERN:PARAM=VALUE",
              help="A parameter for the tensors matching PATTERN, e.g. 'head/*:t=0.8'.")
@click.option("--select", default="*", show_default=True, help="Merge only tensors matching this glob.")
@click.option("--state", type=click.Choice(["template", "average"]), default="template",
              show_default=True, help="Float state (BatchNorm statistics): the template's, or the mean.")
@click.option("--optimizer-from", default=None, metavar="NAME",
              help="Keep this input's optimizer state (default: dropped, a fresh optimizer).")
@click.option("--dry-run", is_flag=True, help="Print the plan (every name and shape checked) and stop.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan (and what was written) as JSON.")
@click.option("--no-hash-inputs", is_flag=True, help="Do not record the inputs' sha256.")
@click.option("--model", default=None, type=click.Path(),
              help="For bare weights (.weights.h5/.weights.json): the .keras or config.json binding their slots.")
@executor_options("ray: sharded .weights.json templates and outputs only, one task per output shard")
def merge_cmd(models, output, base, method, weight, density, drop, scale, t, normalize, combine,
              seed, sets, select, state, optimizer_from, dry_run, as_json, no_hash_inputs, model,
              executor, workers, address):
    """Merge fine-tunes of one base model.

    Inputs in any readable formats. Tensors pair by canonical name; every name and shape is checked before any value is
    read; tensors stream one at a time across all inputs. The output has the layout and
    format of the template (--optimizer-from, else --base, else the first model).

    \b
    Examples:
      surgeon merge --base base.keras ft_a.keras ft_b.keras --method ties --density 0.5 -o merged.keras
      surgeon merge a.keras b.keras --method slerp --t 0.3 --set 'head/*:t=0.8' -o mid.keras
      surgeon merge a.keras b_ckpt/ --weight 0.7,0.3 -o avg.keras --dry-run
      surgeon merge a.weights.json b.weights.json --model a.keras -o m.weights.json --executor ray
    """
    from surgeon.cli.recipe import _progress_printer, render
    from surgeon.recipe.merging import merge_checkpoints
    params = {k: v for k, v in (("weight", _weights(weight)), ("density", _weights(density)),
                                ("p", _weights(drop)), ("scale", scale), ("t", t),
                                ("normalize", normalize), ("combine", combine), ("seed", seed))
              if v is not None}
    ex = make(executor, workers, address)
    plan, stats = merge_checkpoints(
        models, output, base=base, method=method, params=params, overrides=list(sets),
        optimizer_from=optimizer_from, state=state, select=select, dry_run=dry_run,
        hash_inputs=not no_hash_inputs, progress=_progress_printer(not as_json),
        text=" ".join(["surgeon merge"] + sys.argv[2:]), model=model, executor=ex)
    render(plan, stats, dry_run, as_json)


@click.group("lora")
def lora_group():
    """LoRA: fold adapters in, or extract one.

    \b
    Examples:
      surgeon lora merge lora_model.keras -o plain.keras
      surgeon lora extract --base base.keras tuned.keras --rank 8 -o adapter.npz
    """


@lora_group.command("merge")
@click.argument("src", type=click.Path())
@click.option("-o", "--output", required=True, help="The plain model (.keras).")
@click.option("--like", default=None, type=click.Path(),
              help="For a TF checkpoint: the LoRA model's .keras (config and optimizer).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def lora_merge_cmd(src, output, like, as_json):
    """Fold every LoRA adapter into its kernel.

    From a TF checkpoint (factors stored), kernel + (alpha/rank)·A·B; from a .keras, the
    stored kernel (Keras saves it folded). lora_rank/lora_alpha leave the config, the
    factors' optimizer slots are dropped, the kernel is trainable again with zero slots.

    \b
    Examples:
      surgeon lora merge lora_model.keras -o plain.keras
      surgeon lora merge ckpt_dir/ --like lora_model.keras -o plain.keras
    """
    from surgeon.train.lora import merge_lora
    rep = merge_lora(src, output, like)
    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=1))
        return
    for x in rep.layers:
        click.echo(f"  {x['layer']}: rank {x['rank']}, alpha {x['alpha']:g} ({x['kernel']})")
    click.echo(f"  optimizer: {len(rep.dropped_slots)} factor slot(s) dropped, "
               f"{len(rep.zeroed_slots)} kernel slot(s) start at zero")
    click.echo(f"wrote {output} ({len(rep.layers)} LoRA layer(s) merged)")


@lora_group.command("extract")
@click.argument("tuned", type=click.Path())
@click.option("--base", required=True, type=click.Path(), help="The model TUNED was fine-tuned from.")
@click.option("--rank", required=True, type=int, help="The adapter's rank.")
@click.option("-o", "--output", required=True, help="The adapter (.npz, keyed by layer path).")
@click.option("--model", default=None, help="For bare .weights.h5 inputs: their .keras or config.json.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def lora_extract_cmd(tuned, base, rank, output, model, as_json):
    """Extract a LoRA adapter: truncated SVD of tuned - base.

    Per 2-D kernel, A = U_r S_r and B = V_r^T (alpha = rank); tensors that differ but
    cannot be factored (biases, BatchNorm, conv kernels) are stored whole. Load it with
    surgeon.keras.load_lora(model, adapter) on a model built from the base.

    \b
    Examples:
      surgeon lora extract --base base.keras tuned.keras --rank 8 -o adapter.npz
    """
    from surgeon.train.lora import extract_lora
    meta = extract_lora(base, tuned, rank, output, model=model)
    if as_json:
        click.echo(json.dumps(meta, indent=1))
        return
    for x in meta["layers"]:
        click.echo(f"  {x['layer']}/{x['weight']}: rank {x['rank']}, relative error {x['rel_error']:.3g}")
    if meta["full"]:
        click.echo(f"  stored whole: {', '.join(meta['full'])}")
    click.echo(f"wrote {output} ({len(meta['layers'])} factored kernel(s))")


def register(main):
    main.add_command(merge_cmd)
    main.add_command(lora_group)
