"""`bra-sae`: fit, evaluate, export, describe and score SAEs over a store, compare score reports, and run
and measure residual edits (intervene, effects) (parses arguments, calls the library)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from bra.audit.config import ScoreConfig
from bra.audit.edits import EffectsConfig, InterveneConfig
from bra.cli.common import (
    NPROC_OPTION,
    SAE_SOURCE,
    SAE_SOURCE_HELP,
    STORE_PATH,
    relaunch_under_torchrun,
    run_cli,
    setup_logging,
)
from bra.cli.options import ConfigOptions
from bra.sae.config import PRESETS, TrainConfig

TRAIN_OPTIONS = ConfigOptions(TrainConfig, defaults_none=True)
"""One --flag per TrainConfig field, default None so a preset can fill what is not given."""
SCORE_OPTIONS = ConfigOptions(ScoreConfig)
"""One --flag per ScoreConfig field, with the dataclass defaults."""
INTERVENE_OPTIONS = ConfigOptions(InterveneConfig, exclude=("edits",))
"""One --flag per InterveneConfig field but the edits (--edit, repeatable: a spec holds commas)."""
EFFECTS_OPTIONS = ConfigOptions(EffectsConfig)
"""One --flag per EffectsConfig field."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (DEBUG).")
@click.version_option(package_name="biorefusalaudit")
def cli(verbose: int) -> None:
    """Stage two of BioRefusalAudit: train, evaluate and export TopK SAEs from an activation store,
    evaluate pretrained ones (JumpReLU, standard, Gemma Scope), and score refusal depth from an eval store.
    Never runs the model unless asked (eval --model)."""
    setup_logging(verbose)


@cli.command()
@click.option("--store", required=True, type=STORE_PATH,
              help="Activation store (bra-cache build): a folder or a URL (s3://, memory://, file://).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="seed: a reconstruction of the seed recipe (d_sae 6144, k 32, AdamW 3e-4, 5,000 steps, "
                   "L1 0.05 + cosine tier term 0.05; the two coefficients were solved from two published "
                   "loss totals, not published); contrastive: NT-Xent + AuxK (default settings); plain: no "
                   "tier term.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@NPROC_OPTION
@TRAIN_OPTIONS
@click.pass_context
def fit(ctx: click.Context, store: Path | str, out: Path, preset: str | None, resume: bool, nproc: int,
        **flags: Any) -> None:
    """Train a TopK SAE on STORE's activations, streaming them from disk. Under torchrun (DDP) each process
    reads its own shards for its share of every batch; --batch-size stays the global batch."""
    from bra.sae.workflows import fit_in_process_group

    cfg = TRAIN_OPTIONS.build(flags, base=PRESETS.get(preset or "", {}))
    relaunch_under_torchrun(ctx, "bra.cli.sae", nproc)
    if fit_in_process_group(store, out, cfg, resume=resume):
        click.echo(f"{out}: trained ({cfg.steps} steps); SAELens format in {out}/sae, "
                   f"seed layout {out}/sae_weights.pt", err=True)


@cli.command("eval")
@click.option("--sae", "sae_path", required=True, type=SAE_SOURCE,
              help=f"{SAE_SOURCE_HELP} With 'none', FVU 0 and CE-loss score 1 hold by construction.")
@click.option("--store", required=True, type=STORE_PATH, help="Activation store (a folder or a URL).")
@click.option("--layer", type=int, default=None, help="Store layer (default: the SAE's).")
@click.option("--split", type=click.Choice(["heldout", "all"]), default="heldout",
              help="Documents to evaluate on (held-out: the run's recorded split).")
@click.option("--model", "with_model", is_flag=True,
              help="Also compute the CE-loss score (loads the store's model).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write JSON here too.")
def eval_cmd(sae_path: Path | str, store: Path | str, layer: int | None, split: str, with_model: bool,
             out: Path | None) -> None:
    """FVU, L0, dead/dense fractions and per-tier reconstruction of an SAE (TopK, JumpReLU, standard, or
    none) on a store."""
    from bra.fsutil import write_text_atomic
    from bra.sae.workflows import evaluate

    result = evaluate(sae_path, store, layer, split, with_model)
    text = json.dumps(result, indent=2)
    if out is not None:
        write_text_atomic(out, text)
    click.echo(text)


@cli.command()
@click.option("--sae", "sae_path", required=True, type=click.Path(path_type=Path),
              help="TopK SAE to convert (a fit run dir, a SAELens topk dir, or a seed .pt).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output path.")
@click.option("--format", "fmt", type=click.Choice(["saelens", "seed"]), default="saelens", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
def export(sae_path: Path, out: Path, fmt: str, overwrite: bool) -> None:
    """Write a TopK SAE in SAELens format (cfg.json + safetensors) or the seed layout (sae_weights.pt)."""
    from bra.sae.workflows import export as export_sae

    click.echo(f"wrote {export_sae(sae_path, out, fmt, overwrite)}")


@cli.command()
@click.argument("sae_path", type=click.Path(path_type=Path))
def info(sae_path: Path) -> None:
    """Describe an SAE: architecture, shapes, k, hook, model, provenance."""
    from bra.sae.workflows import describe

    click.echo(json.dumps(describe(sae_path), indent=2))


def _baselines(ctx: click.Context, param: click.Parameter,
               values: tuple[str, ...]) -> dict[str, Path | str]:
    """--baseline NAME=SAE (repeatable) -> {NAME: SAE}; names must be unique; SAE may be `none`."""
    pairs: dict[str, Path | str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected NAME=SAE, got {value!r}", param_hint="--baseline")
        if name in pairs:
            raise click.BadParameter("baseline names must be unique", param_hint="--baseline")
        pairs[name] = SAE_SOURCE.convert(path, param, ctx)
    return pairs


@cli.command("score")
@click.option("--store", required=True, type=STORE_PATH,
              help="Eval store (bra-cache build of an eval manifest).")
@click.option("--sae", "sae_path", required=True, type=SAE_SOURCE,
              help=f"{SAE_SOURCE_HELP} The random-SAE baseline has the same architecture and size.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output directory (replaced whole; refused if it holds anything but a score report).")
@click.option("--baseline", "baseline", multiple=True, metavar="NAME=SAE", callback=_baselines,
              help="A baseline SAE (any --sae form, 'none' included) scored with the same probe "
                   "(repeatable).")
@SCORE_OPTIONS
def score_cmd(store: Path | str, sae_path: Path | str, out: Path, baseline: dict[str, Path | str],
              **fields: Any) -> None:
    """Refusal depth of an eval store's prompts: the catalog (FDR-controlled), calibrated depth verdicts of
    refusals, divergence D, and the hazard AUROC table with like-for-like baselines, paired comparisons and
    the spread over repeated splits; writes scores.parquet, catalog.json, report.json and report.html to
    OUT. Needs no model."""
    from bra.audit.score import score

    cfg = SCORE_OPTIONS.build(fields)
    report = score(store, sae_path, out, cfg, baseline)
    best = [f"{r['method']} {r['auroc']:.3f}" for r in report["auroc"]
            if r["auroc"] is not None and r["segment"] == cfg.probe_segment]
    verdicts = ", ".join(f"{k} {v}" for k, v in report["depth"]["verdicts"].items())
    click.echo(f"{out}: report.html, report.json, scores.parquet; AUROC ({cfg.probe_segment}): "
               f"{', '.join(best)}; refusal depth (test, {report['depth']['n_refused_test']} refused): "
               f"{verdicts}", err=True)


def _named_reports(ctx: click.Context, param: click.Parameter,
                   values: tuple[str, ...]) -> tuple[tuple[str, Path], ...]:
    """--name NAME=REPORT_DIR (repeatable) -> ((NAME, REPORT_DIR), ...), in the order given."""
    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path:
            raise click.BadParameter(f"expected NAME=REPORT_DIR, got {value!r}", param_hint="--name")
        pairs.append((name, Path(path)))
    return tuple(pairs)


@cli.command("compare")
@click.argument("report_dirs", nargs=-1, type=click.Path(path_type=Path), metavar="REPORT_DIR...")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output directory (replaced whole; refused if it holds anything but a comparison).")
@click.option("--name", "names", multiple=True, metavar="NAME=REPORT_DIR", callback=_named_reports,
              help="Label REPORT_DIR as NAME (repeatable); a REPORT_DIR not given as an argument is added.")
def compare_cmd(report_dirs: tuple[Path, ...], out: Path, names: tuple[tuple[str, Path], ...]) -> None:
    """One table and plot across score reports (models, SAEs, generation variants), from the REPORT_DIR
    folders of `bra-sae score` alone (report.json, scores.parquet; never a store or a model).

    Per run: model, SAE, layer, prompts; refusal rate by tier (95% Wilson); the AUROC rows with their CIs
    and p-values (a method a run lacks shows as absent); depth verdicts (count, share, 95% Wilson); D mean
    by tier (95% t-interval). Writes comparison.md, comparison.json and comparison.png to OUT.

    Labels: --name, else MODEL/SAE (last path parts of the report's model id and SAE path; for a fit run's
    inner sae/ or sae_weights.pt, the run folder's name), with @STORE appended (the eval store's name: one
    generation variant) when the reports were scored on different stores. Labels must be unique."""
    from bra.audit.compare import compare_reports

    comparison = compare_reports(report_dirs, out, names)
    labels = ", ".join(r.label for r in comparison.runs)
    click.echo(f"{out}: comparison.md, comparison.json, comparison.png ({labels})", err=True)


def _validation_runs(ctx: click.Context, param: click.Parameter,
                     values: tuple[str, ...]) -> dict[str, tuple[str, str | None]]:
    """--run NAME=PLAIN_STORE[,PREFILL_STORE] (repeatable) -> {NAME: (PLAIN, PREFILL or None)}."""
    runs: dict[str, tuple[str, str | None]] = {}
    for value in values:
        name, sep, stores = value.partition("=")
        parts = [p for p in stores.split(",") if p]
        if not sep or not name.strip() or not 1 <= len(parts) <= 2 or len(stores.split(",")) != len(parts):
            raise click.BadParameter(f"expected NAME=PLAIN_STORE[,PREFILL_STORE], got {value!r}",
                                     param_hint="--run")
        if name in runs:
            raise click.BadParameter(f"run {name!r} named twice", param_hint="--run")
        runs[name] = (parts[0], parts[1] if len(parts) == 2 else None)
    if not runs:
        raise click.BadParameter("name at least one run", param_hint="--run")
    return runs


@cli.command("validate")
@click.option("--run", "runs", multiple=True, metavar="NAME=PLAIN_STORE[,PREFILL_STORE]",
              callback=_validation_runs,
              help="An eval store of one model (repeatable), and optionally its prefilled variant's store. "
                   "The names 'shallow' and 'deep' mark the known-depth organism pair; others (the base "
                   "model) are reported beside them.")
@click.option("--sae", "sae_path", required=True, type=SAE_SOURCE, help=SAE_SOURCE_HELP)
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output directory: report.json, report.md and plots (replaced whole).")
@click.option("--n-boot", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Bootstrap resamples of every AUROC's interval.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the splits and resamples.")
@click.option("--reference", default=None, metavar="NAME",
              help="Fit the audit once on this run's plain store (catalog, depth scale, D threshold, raw "
                   "baseline) and apply it unchanged to every store, as the headline; each store's own fit "
                   "is reported after it. Default: own fits only. `make validate` uses the base model.")
def validate_cmd(runs: dict[str, tuple[str, str | None]], sae_path: Path | str, out: Path, n_boot: int,
                 seed: int, reference: str | None) -> None:
    """Known-depth validation: score each run's stores as `score` would, then report refusal rates (plain
    and prefilled), depth verdicts per organism, the AUROC of the depth score, D and a raw-residual baseline
    separating the shallow organism's refusals from the deep one's, and prefill success with the AUROC of
    each score predicting which refusals a prefill breaks. An organism trained on an audited prompt is
    refused."""
    import shlex

    from bra.audit.config import ScoreConfig
    from bra.audit.validate import run_validation

    args = [a for name, (plain, pre) in runs.items()
            for a in ("--run", f"{name}={plain}" + (f",{pre}" if pre else ""))]
    args += ["--sae", str(sae_path), "--out", str(out), "--n-boot", str(n_boot), "--seed", str(seed)]
    args += ["--reference", reference] if reference else []
    command = "bra-sae validate " + " ".join(shlex.quote(a) for a in args)
    run_validation(runs, str(sae_path), out, ScoreConfig(seed=seed, n_boot=n_boot, repeats=1), command,
                   reference=reference)
    click.echo(f"{out}: report.md, report.json, plots", err=True)


@cli.command("intervene")
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--edit", "edits", multiple=True, metavar="SPEC",
              help="OP[=VALUE]:TARGET=NAME[:random=SEED] (repeatable, one store each): "
                   "ablate|scale=S|clamp=V on category=CAT or latents=IDS; ablate|scale=S|add=S on "
                   "direction=refusal|hazard|FILE; :random=SEED is the random control.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder of the edited eval stores (<out>/<edit>.zarr) and the computed directions.")
@click.option("--overwrite", is_flag=True, help="Rebuild edited stores that exist.")
@INTERVENE_OPTIONS
def intervene_cmd(manifest: Path, edits: tuple[str, ...], out: Path, overwrite: bool, **fields: Any) -> None:
    """Regenerate MANIFEST's eval completions with each --edit applied at the hooked layer (every position,
    prompt and generated tokens): one ordinary eval store per edit, its edit in the attrs, resumable after a
    kill; `bra-sae score` and `bra-cache relabel` read it unchanged. Every edit is checked before anything
    is generated."""
    from bra.audit.intervene import intervene
    from bra.pipeline.manifest import load_manifest

    cfg = INTERVENE_OPTIONS.build(fields, base={"edits": edits})
    for item, result in intervene(load_manifest(manifest), out, cfg, overwrite):
        click.echo(f"{result.path}: {result.status} ({item.spec.text})", err=True)


@cli.command("effects")
@click.argument("base_store", type=STORE_PATH)
@click.argument("edited_stores", nargs=-1, type=STORE_PATH, metavar="EDITED_STORE...")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output directory (replaced whole; refused if it holds anything but an effects output).")
@EFFECTS_OPTIONS
def effects_cmd(base_store: Path | str, edited_stores: tuple[Path | str, ...], out: Path,
                **fields: Any) -> None:
    """What the edits of `bra-sae intervene` changed against BASE_STORE (the unedited store of the same
    manifest): surface label per prompt before and after; refusal rate per tier before, after and its
    change with a paired bootstrap CI, random controls beside their edit; a dose-response plot over the
    edits that differ only in their number. With --sae: the change in D and in the depth score under one
    fit of the audit on BASE_STORE applied to every edited store, and the depth-category / D-verdict
    transitions. Writes effects.json, effects.md and effects.png to OUT."""
    from bra.audit.effects import effects

    doc = effects(base_store, edited_stores, out, EFFECTS_OPTIONS.build(fields))
    click.echo(f"{out}: effects.md, effects.json, effects.png ({len(doc['runs'])} edited stores)", err=True)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    sys.exit(run_cli(cli, argv))


if __name__ == "__main__":
    main()
