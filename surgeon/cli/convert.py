"""``surgeon convert``: any readable checkpoint -> .keras / .weights.h5 / legacy .h5 / TF checkpoint."""
from __future__ import annotations

import json

import click

from surgeon.cli.executor_opts import executor_options, make
from surgeon.formats import STEP_HELP, select_step


def _render(report) -> str:
    lines = [f"{report.source} -> {report.target}  [{report.target_format}]"]
    width = max([len(p.target) for p in report.pairs] or [10])
    for p in report.pairs:
        src = p.source if p.source is not None else (
            "(the source's optimizer config)" if p.how == "config" else "(none: Keras initial value kept)")
        lines.append(f"  {p.target:<{width}}  <- {src}  [{p.how}]")
    for name in report.unmatched_source:
        lines.append(f"  unmatched source tensor (not written): {name}")
    moved = sum(1 for p in report.pairs if p.how == "slot")
    lines.append(f"optimizer: {report.optimizer or 'none'}, {moved} slot tensors moved, "
                 f"iterations={report.iterations}")
    lines += [f"note: {n}" for n in report.notes]
    lines.append(f"wrote {report.target}")
    return "\n".join(lines)


@click.command("convert")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--like", default=None,
              help="Target model: a .keras file or module:function building a Keras 3 model "
                   "(default: the source's own model config).")
@click.option("--optimizer", "optimizer", type=click.Choice(["keep", "drop"]), default="keep",
              show_default=True, help="Carry the optimizer state over, or write none.")
@click.option("--allow-missing", is_flag=True,
              help="Keep Keras' initial values for target tensors that have no source.")
@click.option("--model", type=click.Path(), default=None,
              help="For a bare .weights.h5 source: the .keras file or config.json it belongs to.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--step", type=int, default=None, help=STEP_HELP)
@click.option("--max-shard-size", type=float, default=None, metavar="GB",
              help="A .weights.json (sharded) target's shard size, in GB as Keras' max_shard_size "
                   "(default: the source's largest shard if it is sharded, else 5).")
@executor_options("pool and ray: sharded .weights.json targets only, one task per output shard")
def convert_cmd(src, dst, like, optimizer, allow_missing, model, as_json, step, max_shard_size,
                executor, workers, address):
    """Convert between formats, optimizer included.

    SRC to DST: .keras, .weights.h5, sharded .weights.json, legacy .h5 or a TF
    checkpoint prefix such as out/model.ckpt, optimizer state included.

    Keras 3 writes an empty copy of the target model (compiled with the source's
    optimizer); surgeon fills every tensor from SRC, matching by canonical name, then
    by layer order and shape, and prints every pair. Optimizer slots are moved per
    weight and re-laid-out in the target optimizer's order; the iteration count is
    copied, so Keras resumes training where SRC stopped. Model configs holding Lambda
    layers are refused (stored code is never executed).

    \b
    Examples:
      surgeon convert fixtures/realworld/emotion_model.hdf5 emotion.keras
      surgeon convert fixtures/cnn_adam.keras cnn_adam_legacy.h5
      surgeon convert fixtures/legacy/k20_mlp_adam.h5 out/k20.ckpt
      surgeon convert fixtures/cnn_adam.weights.h5 out.keras --model fixtures/cnn_adam.keras
      surgeon convert old.h5 new.keras --like mypkg.models:build --allow-missing --json
      surgeon convert big.keras out/big.weights.json --max-shard-size 2 --executor ray
    """
    from surgeon.convert import convert

    ex = make(executor, workers, address)  # (refuses --workers/--address without pool/ray)
    with select_step([src], step):
        report = convert(src, dst, like=like, optimizer=optimizer, allow_missing=allow_missing,
                         model=model, executor=ex, max_shard_size=max_shard_size)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=1))
    else:
        click.echo(_render(report))


def register(main):
    main.add_command(convert_cmd)
