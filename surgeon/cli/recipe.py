"""CLI: ``surgeon apply``, ``surgeon transplant``, ``surgeon log``."""
from __future__ import annotations

import json
import sys
import time

import click

from surgeon.formats import STEP_HELP, select_step


IN_PLACE_HELP = ("Edit the input file where it lies (.keras, .weights.h5, legacy .h5), writing "
                 "only the changed bytes, crash-safe through a rollback journal beside it; "
                 "only edits keeping every shape and dtype")


def _replace(rec, **changes):
    import dataclasses
    return dataclasses.replace(rec, **changes)


def _progress_printer(enabled):
    """Progress on stderr, shown only when the work lasts more than a second."""
    if not enabled:
        return None
    start = time.perf_counter()

    def show(done, total, name):
        if time.perf_counter() - start > 1.0:
            end = "\n" if done == total else "\r"
            click.echo(f"surgeon: {done}/{total} tensors  {name[:60]:<60}", err=True, nl=False)
            click.echo(end, err=True, nl=False)
    return show


def plan_text(plan) -> str:
    """Human-readable plan: one line per step, slots and iteration, reports, warnings."""
    lines = [f"plan: {plan.input} [{plan.format}] -> {plan.output or '(no output)'}"]
    for st in plan.structural:  # whole-model rewrites, run before the tensor steps
        first, *more = st["text"].splitlines()
        lines.append(f"  {first}  [{st['where']}]")
        lines.extend(f"  {line}" for line in more)
    for s in plan.steps:
        src = f" <- {s.source}" if s.source else ""
        shape = "x".join(map(str, s.shape)) or "scalar"
        dt = s.dtype if s.dtype == s.new_dtype else f"{s.dtype}->{s.new_dtype}"
        detail = ", ".join(f"{k}={v}" for k, v in s.detail if k != "source_path")
        lines.append(f"  {s.op:<14} {s.target}{src}  {shape} {dt}  {detail}  [{s.where}]")
        for name, policy in s.slots:
            lines.append(f"      slot {name.rsplit('/', 1)[-1]:<16} {policy}")
    if plan.iteration:
        it = plan.iteration
        lines.append(f"  iteration      {it['before']} -> {it['after']} ({it['policy']})")
    for r in plan.reports:
        lines.append(f"  {r['op']} from {r['source']}: {len(r['matched'])} matched, "
                     f"{len(r['mismatched'])} mismatched, {len(r['unmatched_targets'])} targets "
                     f"unmatched, {len(r['unused_sources'])} sources unused")
        for m in r["mismatched"]:
            lines.append(f"      {m['source']} {m['source_shape']} -> {m['target']} {m['shape']}: {m['action']}")
        for n in r["unmatched_targets"]:
            lines.append(f"      unmatched target {n} (kept)")
        for n in r["unused_sources"]:
            lines.append(f"      unused source {n}")
    lines.extend(f"  note: {n}" for n in getattr(plan, "notes", ()))
    touched = len({s.target for s in plan.steps})
    slots = sum(1 for s in plan.steps for _, p in s.slots if p != "keep")
    tensor_part = f"{touched} tensor(s) changed, {slots} slot change(s)"
    if plan.structural:
        tensor_part = f"{structural_summary(plan.structural)}; then {tensor_part} by the tensor ops"
    lines.append(f"{tensor_part}; everything else copied as stored")
    return "\n".join(lines)


def structural_summary(structural) -> str:
    """``widen (fc1): 3 tensor(s) rewritten, 1 new, 0 removed`` for each structural edit."""
    parts = []
    for st in structural:
        p = st.get("plan") or {}
        actions = p.get("actions", [])
        new = sum(1 for a in actions if a.get("source") is None)
        layers = ", ".join(p.get("new_layers", []) + p.get("changed_layers", []))
        parts.append(f"{p.get('op', '?')}{f' ({layers})' if layers else ''}: "
                     f"{len(actions) - new} tensor(s) rewritten, {new} new, "
                     f"{len(p.get('removed', []))} removed (slots {p.get('slots', '?')})")
    return "; ".join(parts)


def _early(dry_run, hash_inputs, hash_paths=(), src=None, target=None):
    """Start, from the command line alone, what does not need the recipe: hashing the
    inputs named there and cloning ``src`` to ``target``'s temp file (``EarlyStart``),
    so that they overlap loading the recipe and importing numpy, h5py and the ops."""
    from surgeon.formats.clone import EarlyStart
    if dry_run:
        return EarlyStart(hash_inputs=False)
    return EarlyStart(hash_paths, hash_inputs, src, target)


def _run(rec, dry_run, as_json, progress, hash_inputs=True, in_place=False, executor=None,
         early=None):
    from surgeon.recipe.execute import apply
    show = _progress_printer(progress and not as_json)
    if in_place and not dry_run:
        from surgeon.recipe.in_place import apply_in_place
        plan, stats = apply_in_place(rec, progress=show, hash_inputs=hash_inputs, early=early)
    else:
        if in_place:
            from surgeon.recipe.in_place import check_recipe
            check_recipe(rec)
            rec = _replace(rec, output=rec.input)
        plan, stats = apply(rec, dry_run=dry_run, progress=show, make_dirs=True,
                            hash_inputs=hash_inputs, executor=executor, early=early)
    render(plan, stats, dry_run, as_json)


def render(plan, stats, dry_run, as_json):
    """The plan and what was written, as text or JSON (warnings on stderr)."""
    for w in plan.warnings:
        click.echo(f"surgeon: warning: {w}", err=True)
    if as_json:
        out = {"plan": plan.to_json(), "dry_run": dry_run}
        if stats:
            out["written"] = {"output": plan.output, "tensors": stats.tensors, "slots": stats.slots,
                              "bytes": stats.bytes, "seconds": round(stats.seconds, 3),
                              "structural_edits": len(plan.structural)}
            if stats.bytes_written is not None:
                out["written"].update(in_place=True, bytes_written=stats.bytes_written)
        click.echo(json.dumps(out, indent=1))
        return
    click.echo(plan_text(plan))
    if stats and stats.bytes_written is not None:
        click.echo(f"edited {plan.output} in place ({stats.tensors} tensors, {stats.slots} slots "
                   f"changed, {stats.bytes_written} bytes written, {stats.seconds:.2f}s)")
    elif stats:
        edits = f"{len(plan.structural)} structural edit(s), then " if plan.structural else ""
        click.echo(f"wrote {plan.output} ({edits}{stats.tensors} tensors, {stats.slots} slots changed, "
                   f"{stats.seconds:.2f}s)")
    else:
        click.echo("dry run: nothing written")


@click.command("apply")
@click.argument("recipe", type=click.Path())
@click.option("-i", "--input", "input_", default=None, help="Input checkpoint (overrides the recipe's).")
@click.option("-o", "--output", default=None, help="Output path (overrides the recipe's).")
@click.option("--model", default=None, help="For a bare .weights.h5 input: its .keras or config.json.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value: input, output, iteration, sources.NAME, ops.N.PARAM "
                   "(N from 0). Values use TOML syntax (0.5, true, [1, 2]) or are strings.")
@click.option("--dry-run", is_flag=True, help="Print the validated plan and stop; nothing is read or written.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan (and what was written) as JSON.")
@click.option("--no-progress", is_flag=True, help="No progress line on stderr.")
@click.option("--no-hash-inputs", is_flag=True,
              help="Do not record the inputs' content hash (sha256 or BLAKE3) in the provenance "
                   "(saves reading them once).")
@click.option("--in-place", is_flag=True, help=IN_PLACE_HELP)
@click.option("--executor", type=click.Choice(["local", "pool", "ray"]), default="local", show_default=True,
              help="Who computes the tensors: this process, a local process pool, or a Ray cluster "
                   "(sharded outputs: .weights.json, TF checkpoints, Orbax). The output is the same.")
@click.option("--workers", type=int, default=None,
              help="pool: processes (default: the cores); ray: concurrent shard tasks.")
@click.option("--address", default=None, help="ray: the cluster to join (default: RAY_ADDRESS or a local one).")
@click.option("--step", type=int, default=None, help=STEP_HELP)
def apply_cmd(recipe, input_, output, model, sets, dry_run, as_json, no_progress, no_hash_inputs,
              in_place, executor, workers, address, step):
    """Apply a recipe (.py/.toml) to a checkpoint.

    The recipe is planned and fully validated first (names, shapes, dtypes, no tensor
    written twice); then every affected tensor and its optimizer slots are streamed to the
    output, everything else is copied as stored, and the surgery log is embedded.

    \b
    Examples:
      surgeon apply recipes/transfer_backbone.py
      surgeon apply recipes/reset_head.py --dry-run
      surgeon apply recipes/shrink_perturb.toml -i fixtures/cnn_adam.keras -o out/sp.keras
      surgeon apply recipes/reset_head.py --set ops.0.seed=7 --set iteration=reset --json
      surgeon apply rescale_all.py -i big.keras -o out.keras --executor pool --workers 8
      surgeon apply rescale_all.py -i w.weights.json -o out.weights.json --executor ray
    """
    new_file = not in_place and executor != "ray"
    with _early(dry_run or not new_file, not no_hash_inputs, [input_],
                input_, output if new_file else None) as early:
        from surgeon.recipe import apply_overrides, load_recipe
        from surgeon.recipe.executors import make_executor
        ex = make_executor(executor, workers, address)
        rec = apply_overrides(load_recipe(recipe), input=input_, output=output, sets=sets, model=model)
        if in_place and output is None:  # the recipe's own output, if any, is not this run's
            rec = _replace(rec, output=None)
        if in_place and executor != "local":
            from surgeon.core.errors import RecipeError
            raise RecipeError("--in-place patches the file from this process; "
                              "--executor is for runs that write a new output (-o)")
        with select_step([rec.input], step):
            _run(rec, dry_run, as_json, not no_progress, not no_hash_inputs, in_place, ex, early)


@click.command("transplant")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("-o", "--output", default=None, help="Where to write DST with the transplanted layers.")
@click.option("--layers", "layers", multiple=True, metavar="PATTERN[=REPLACEMENT]",
              help="Layers of SRC to copy, e.g. 'encoder/*=backbone/*' or 'conv1' (repeatable; "
                   "default: every layer of SRC whose name exists in DST).")
@click.option("--slots", type=click.Choice(["transplant", "reset", "warm", "keep"]), default="transplant",
              show_default=True, help="What happens to the optimizer slots of the copied weights.")
@click.option("--on-mismatch", type=click.Choice(["error", "skip", "slice", "pad", "reinit"]),
              default="error", show_default=True, help="When a copied tensor's shape differs.")
@click.option("--iteration", default="keep", show_default=True, help="keep, reset or a step number.")
@click.option("--dry-run", is_flag=True, help="Print the plan and stop.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--in-place", is_flag=True, help=IN_PLACE_HELP + " (instead of -o OUTPUT)")
@click.option("--step", type=int, default=None, help=STEP_HELP)
def transplant_cmd(src, dst, output, layers, slots, on_mismatch, iteration, dry_run, as_json,
                   in_place, step):
    """Copy layers and their slots from SRC to DST.

    Weights and optimizer slots of the chosen layers of SRC go into DST, written to
    OUTPUT. The one-line form of a recipe with a single transplant op.

    \b
    Examples:
      surgeon transplant fixtures/cnn_adam.keras fixtures/recipe/cnn5_fresh.keras \\
          -o out/cnn5_transplant.keras --layers conv1 --layers conv2 --layers bn --iteration 3
      surgeon transplant a.keras b.keras -o c.keras --layers 'encoder/*=backbone/*' --slots reset
    """
    from surgeon.core.errors import SurgeonError
    if output is None and not in_place:
        raise SurgeonError("transplant needs -o OUTPUT (or --in-place to edit DST where it lies)")
    # the edited file itself is not hashed in place (see surgeon.recipe.in_place)
    with _early(dry_run, True, [src] if in_place else [dst, src], dst,
                None if in_place else output) as early:
        from surgeon.recipe import Recipe, check_iteration, declare
        from surgeon.recipe.schema import Where
        where = Where("surgeon transplant", 0)
        if not layers:
            layers = ("*",)
        spec = declare("transplant", {"source": src, "layers": list(layers), "slots": slots,
                                      "on_mismatch": on_mismatch}, where)
        text = " ".join(["surgeon transplant"] + sys.argv[2:])
        rec = Recipe(input=dst, output=output, ops=(spec,), iteration=check_iteration(iteration, where),
                     path="surgeon transplant", text=text, where=where)
        with select_step([src, dst], step):
            _run(rec, dry_run, as_json, True, in_place=in_place, early=early)


@click.command("log")
@click.argument("checkpoint", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the full history as JSON.")
def log_cmd(checkpoint, as_json):
    """Print the surgery log embedded in a file.

    Every surgeon output carries its history (oldest first): tool version, recipe,
    inputs with their content hash (sha256, or BLAKE3 where it is installed), what was done.

    \b
    Examples:
      surgeon log out/transfer_backbone.keras
      surgeon log out/transfer_backbone.keras --json
    """
    from surgeon.core.errors import SurgeonError
    from surgeon.formats import detect
    from surgeon.formats.provenance import check_readable
    detect(checkpoint)
    history = check_readable(checkpoint)
    if as_json:
        click.echo(json.dumps(history, indent=1))
        return
    if not history:
        click.echo(f"{checkpoint}: no surgery log (not written by surgeon)")
        return
    for i, rec in enumerate(history, 1):
        try:
            plan = rec["plan"]
            ins = ", ".join(f"{x['path']} ({_digest_text(x)})" for x in rec["inputs"])
            click.echo(f"#{i} {rec['time']} surgeon {rec['version']}  recipe {rec['recipe']['path']} "
                       f"(sha256 {rec['recipe']['sha256'][:12]})")
            click.echo(f"   inputs: {ins}")
            for st in plan.get("structural", []):
                args = ", ".join(f"{k}={v}" for k, v in st.get("params", {}).items() if not k.startswith("_"))
                click.echo(f"   {st['op']}({args})")
            if rec.get("summary"):  # commands other than apply: what they did
                did = ", ".join(f"{k}={v}" for k, v in rec["summary"].items()
                                if isinstance(v, (int, float, str)) and not isinstance(v, bool))
                click.echo(f"   {rec.get('command')}: {did}")
                continue
            ops = {}
            for s in plan["steps"]:
                ops[s["op"]] = ops.get(s["op"], 0) + 1
            click.echo("   " + (", ".join(f"{k}: {v} tensor(s)" for k, v in ops.items()) or "no tensor changed")
                       + (f"; iteration -> {plan['iteration']['after']}" if plan.get("iteration") else ""))
        except (KeyError, TypeError) as exc:
            raise SurgeonError(f"{checkpoint}: surgery log record #{i} is malformed ({exc})") from None


def _digest_text(entry) -> str:
    """An input's content hash as ``surgeon log`` shows it: sha256 as 12 hex digits (as
    always), another algorithm named (``blake3 1a2b...``), ``-`` when not hashed."""
    from surgeon.formats.provenance import input_digest
    got = input_digest(entry)
    if got is None:
        return "-"
    algorithm, digest = got
    return digest[:12] if algorithm == "sha256" else f"{algorithm} {digest[:12]}"


def register(main):
    main.add_command(apply_cmd)
    main.add_command(transplant_cmd)
    main.add_command(log_cmd)
