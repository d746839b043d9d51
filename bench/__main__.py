"""``python -m bench [--size tiny|small|medium|full] [--out bench/results.md]``: run every study, write
results.md and its JSON twin."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/datasets are imported: never the network
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402

from bench.config import SIZES, STUDIES, get_config  # noqa: E402


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--size",
    type=click.Choice(list(SIZES)),
    default="small",
    show_default=True,
    help="tiny: seconds (smoke test); small: a few minutes on 2 CPU cores; medium; full: GPU.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("bench/results.md"),
    show_default=True,
    help="Markdown results file.",
)
@click.option(
    "--json-out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON twin (default: --out with .json).",
)
@click.option("--studies", default=",".join(STUDIES), show_default=True, help="Comma-separated subset.")
@click.option("--threads", type=int, default=None, help="torch threads on every side (default: torch's).")
@click.option(
    "--work",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Scratch folder (default: a temp folder, removed afterwards).",
)
@click.option("--keep-work", is_flag=True, help="Keep the temp scratch folder.")
@click.option(
    "--max-load",
    type=float,
    default=None,
    help="Wait (up to --max-wait s) until the 1-minute load average is at most this.",
)
@click.option("--max-wait", type=float, default=600, show_default=True)
@click.option("-v", "--verbose", is_flag=True)
def main(
    size: str,
    out: Path,
    json_out: Path | None,
    studies: str,
    threads: int | None,
    work: Path | None,
    keep_work: bool,
    max_load: float | None,
    max_wait: float,
    verbose: bool,
) -> None:
    """Benchmarks of the activation store, the SAE trainer and scoring, side by side with SAELens."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    for noisy in ("transformers", "datasets", "sae_lens", "httpx", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from bench.runner import run_bench, wait_for_quiet

    chosen = [s.strip() for s in studies.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STUDIES]
    if unknown:
        raise click.BadParameter(
            f"unknown study {unknown[0]!r} (choose from {', '.join(STUDIES)})", param_hint="--studies"
        )
    wait_for_quiet(max_load, max_wait)
    command = "python -m bench " + " ".join(sys.argv[1:])
    results = run_bench(
        get_config(size),
        out,
        json_out or out.with_suffix(".json"),
        chosen,
        work,
        threads,
        command.strip(),
        keep_work,
    )
    failed = [r.key for r in results if r.error]
    click.echo(
        f"wrote {out} and {json_out or out.with_suffix('.json')}" + (f"; failed: {failed}" if failed else "")
    )


if __name__ == "__main__":
    main()
