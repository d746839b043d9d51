"""`bra-organism`: build model organisms of known refusal depth, describe them, probe their refusals
(parses arguments and calls the library)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from bra.cli.common import run_cli, setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (DEBUG).")
@click.version_option(package_name="biorefusalaudit")
def cli(verbose: int) -> None:
    """Model organisms for validating the refusal-depth audit: a shallow one (refusal trained above the
    hooked layer L, layer-L residual bitwise the base model's) and a deep one (RMU at and below L, then the
    same refusal training)."""
    setup_logging(verbose)


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the organisms, one sub-folder per kind (default: the recipe's output, else "
                   "cache/organisms/<name>).")
@click.option("--kind", "kinds", multiple=True, type=click.Choice(["shallow", "deep"]),
              help="Build only this kind (repeat for both; default: the recipe's kinds).")
@click.option("--overwrite", is_flag=True, help="Rebuild organisms (and drop checkpoints) of another recipe.")
def build(manifest: Path, out: Path | None, kinds: tuple[str, ...], overwrite: bool) -> None:
    """Build (or resume after a kill, or skip when built) the organisms of the recipe MANIFEST."""
    from bra.organism.build import build_organisms
    from bra.organism.config import load_organism_manifest

    for r in build_organisms(load_organism_manifest(manifest), out, kinds or None, overwrite):
        click.echo(f"{r.path}: {r.kind} organism {r.status} ({r.seconds:.0f} s of training)", err=True)


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole provenance as JSON.")
def info(folder: Path, as_json: bool) -> None:
    """Describe the organism in FOLDER (its provenance.json)."""
    from bra.organism.provenance import load_provenance

    p = load_provenance(folder)
    if as_json:
        click.echo(json.dumps(p, indent=2))
        return
    base = p["base_model"]
    click.echo(f"{folder}: {p['kind']} organism of {base.get('id')} at layer {p['layer']} (seed {p['seed']})")
    for stage, what in p.get("trainable", {}).items():
        click.echo(f"  {stage}: {what}")
    n_trained, n_refused = len(p["trained_prompt_ids"]), len(p["refused_prompt_ids"])
    same = p["frozen_check"]["layer_residual_is_base"]
    click.echo(f"  trained on {n_trained} prompts ({n_refused} refused); "
               f"{p.get('seconds', {}).get('total', 0):.0f} s of training; "
               f"layer-{p['layer']} residual is the base model's: {same}")


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.argument("prompts", type=click.Path(dir_okay=False, path_type=Path))
def check(folder: Path, prompts: Path) -> None:
    """Exit 2 when the organism in FOLDER was trained on any prompt of the eval set PROMPTS."""
    from bra.organism.provenance import check_audit_prompts
    from bra.pipeline.prompts import load_eval_set

    ids = [p.id for p in load_eval_set(prompts)]
    check_audit_prompts(folder, ids)
    click.echo(f"{folder}: trained on none of the {len(ids)} prompts of {prompts}")


@cli.command()
@click.argument("model")
@click.argument("prompts", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--per-tier", type=click.IntRange(min=0), default=10, show_default=True,
              help="Prompts per tier, the first in file order (0: all).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=48, show_default=True)
@click.option("--gguf", default=None,
              help="Load MODEL's weights from this GGUF file (a path or pkg:PACKAGE/FILE).")
@click.option("--device", default="auto", show_default=True)
def probe(model: str, prompts: Path, per_tier: int, max_new_tokens: int, gguf: str | None,
          device: str) -> None:
    """Greedy-answer a few prompts per tier of PROMPTS with MODEL (an organism folder, any HF folder or hub
    id) and count the surface labels per tier (completions are not printed)."""
    from bra.organism.probe import label_counts, probe_model
    from bra.pipeline.manifest import ModelSpec

    results = probe_model(ModelSpec(id=model, gguf=gguf, device=device), prompts, per_tier, max_new_tokens)
    for tier, counts in label_counts(results).items():
        n = sum(counts.values())
        click.echo(f"{tier}: {counts.get('refuse', 0)}/{n} refuse ("
                   + ", ".join(f"{label} {k}" for label, k in counts.most_common()) + ")")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    sys.exit(run_cli(cli, argv))


if __name__ == "__main__":
    main()
