"""`bra-sae`: fit, evaluate, export, describe and score SAEs over a store, and compare score reports
(parses arguments, calls the library)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from bra.audit.config import ScoreConfig
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


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    sys.exit(run_cli(cli, argv))


if __name__ == "__main__":
    main()
