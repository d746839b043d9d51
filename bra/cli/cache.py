"""`bra-cache`: build, inspect and verify activation stores (parses arguments and calls the library)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from bra.cache import schema
from bra.cli.common import NPROC_OPTION, STORE_PATH, relaunch_under_torchrun, run_cli, setup_logging
from bra.pipeline.consensus import DEFAULT_REVIEW_THRESHOLD


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (DEBUG).")
@click.version_option(package_name="biorefusalaudit")
def cli(verbose: int) -> None:
    """Stage one of BioRefusalAudit: run a model over tier-labelled corpora (or eval prompts) once and
    cache its residual-stream activations in a Zarr v3 store."""
    setup_logging(verbose)


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--store", type=STORE_PATH, default=None,
              help="Output store: a folder or a URL (s3://bucket/x.zarr, memory://, file://) "
                   "(default cache/<manifest name>.zarr). With generation variants, a prefix: each variant "
                   "VARIANT builds its own store, with the .zarr suffix replaced by .VARIANT.zarr "
                   "(default cache/<manifest name>.VARIANT.zarr).")
@click.option("--overwrite", is_flag=True, help="Delete an existing store at --store and rebuild it.")
@click.option("--writer-threads", type=click.IntRange(min=1), default=None,
              help="Threads compressing and writing whole shards at once, per process (default: the "
                   "manifest's storage.writer_threads, else the process's cores but one on a GPU, at most 4 "
                   "on a CPU). Speed only: "
                   "the store is the same for any count.")
@NPROC_OPTION
@click.pass_context
def build(ctx: click.Context, manifest: Path, store: Path | str | None, overwrite: bool,
          writer_threads: int | None, nproc: int) -> None:
    """Build (or resume) the store described by MANIFEST. Re-running on a finished store does nothing.
    Under torchrun every process builds its share of the shards.

    An eval manifest's generation.variants (name, chat_template, system_prompt, prefill, max_new_tokens)
    build one eval store each, in manifest order; a complete variant store is skipped, and every other
    variant is checked against the tokenizer before anything is written. A prefill opens the assistant
    turn: the stored completion, and the text its surface label judges, is prefill + continuation."""
    from bra.dist import process_group
    from bra.pipeline.build import build_stores
    from bra.pipeline.manifest import load_manifest

    relaunch_under_torchrun(ctx, "bra.cli.cache", nproc)
    with process_group() as dist:
        results = build_stores(load_manifest(manifest), store, overwrite=overwrite, dist=dist,
                               writer_threads=writer_threads)
    if not dist.is_main:
        return
    for result in results:
        if result.status == "already-complete":
            click.echo(f"{result.path}: already complete ({result.n_tokens:,} tokens); nothing to do",
                       err=True)
        else:
            rate = result.computed_tokens / result.seconds if result.seconds else 0.0
            click.echo(f"{result.path}: {result.status}, {result.n_tokens:,} tokens "
                       f"({result.computed_tokens:,} computed, {rate:,.0f} tok/s)", err=True)


@cli.command()
@click.argument("store", type=STORE_PATH)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info(store: Path | str, as_json: bool) -> None:
    """Describe STORE: tiers, token counts, bytes on disk, compression ratio, provenance."""
    from bra.cache.info import format_info, store_info

    data = store_info(store)
    click.echo(json.dumps(data, indent=2) if as_json else format_info(data))


@cli.command()
@click.argument("store", type=STORE_PATH)
@click.option("--quick", is_flag=True, help="Skip recomputing statistics from the activations.")
def verify(store: Path | str, quick: bool) -> None:
    """Check STORE's schema, completion, checksums, document table and statistics. Exit 1 on any problem."""
    from bra.cache.verify import verify_store

    problems = verify_store(store, deep=not quick)
    if problems:
        for p in problems:
            click.echo(f"{store}: {p}", err=True)
        click.echo(f"error: {len(problems)} problem(s) in {store}", err=True)
        sys.exit(1)
    click.echo(f"{store}: OK")


JUDGE_HELP = ("A judge of the surface labels (repeat for several): local:PATH_OR_ID (an HF chat model "
              "folder, hub id or GGUF), endpoint:URL#MODEL (an OpenAI-compatible /v1/chat/completions "
              "endpoint; key_env=VAR names the environment variable holding its API key), or "
              "command:\"CMD ARGS\" (JSON on stdin -> JSON on stdout); then ,OPTION=VALUE: weight, "
              "name, timeout, retries, backoff, concurrency, max_tokens, device. "
              "Default: the judges: of the store's manifest.")


@cli.command()
@click.argument("store", type=STORE_PATH)
@click.option("--judge", "judges", multiple=True, metavar="SPEC", help=JUDGE_HELP)
@click.option("--no-judges", is_flag=True, help="Rules only, even if the store's manifest names judges.")
@click.option("--judge-cache", type=click.Path(dir_okay=False), default=None,
              help="Vote cache file (default $BRA_JUDGE_CACHE/votes.jsonl, else "
                   "~/.cache/biorefusalaudit/judges/votes.jsonl); cached votes are never asked again.")
@click.option("--rules-weight", type=float, default=1.0, show_default=True,
              help="Weight of the phrase rules' vote in the consensus (0 = judges only).")
@click.option("--review-threshold", type=float, default=DEFAULT_REVIEW_THRESHOLD, show_default=True,
              help="Flag a prompt for review when 1 - the consensus top share exceeds this.")
def relabel(store: Path, judges: tuple[str, ...], no_judges: bool, judge_cache: str | None,
            rules_weight: float, review_threshold: float) -> None:
    """Re-classify the stored completions of eval STORE with the surface rules, and with judges when given
    (no model of the audited model needed): every vote, the consensus, its disagreement and a review flag
    go into prompts.parquet."""
    from bra.pipeline.judges import parse_judge_spec
    from bra.pipeline.relabel import JudgeConfig, relabel_store

    specs = () if no_judges else tuple(parse_judge_spec(j) for j in judges) or None
    table = relabel_store(store, JudgeConfig(specs, judge_cache, rules_weight, review_threshold))
    counts = table["surface_label"].value_counts()
    click.echo(f"{store}: relabelled {len(table)} completions ("
               + ", ".join(f"{label} {n}" for label, n in counts.items()) + ")")
    if schema.NEEDS_REVIEW in table.columns:
        consensus = table[schema.CONSENSUS_LABEL].value_counts()
        click.echo(f"{store}: consensus (" + ", ".join(f"{label} {n}" for label, n in consensus.items())
                   + f"); {int(table[schema.NEEDS_REVIEW].sum())} of {len(table)} need review")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    sys.exit(run_cli(cli, argv))


if __name__ == "__main__":
    main()
