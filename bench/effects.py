"""Causal checks on the demo model (issue 17): ``python -m bench.effects [--work DIR]`` writes
``bench/results-effects.md``.

SmolLM2-135M-Instruct (the eval-demo manifest: 60 prompts, layer 15), regenerated with short completions
(``--max-new-tokens``, default 24) so the run fits two CPU cores. One unedited base store, a score run of it
with the demo SAE (its catalog), then, each beside its random control (``:random=0``):

(a) the refusal direction (refused minus complied, last prompt token, train split) added at scales 1, 2, 4
    (a dose-response), read on the benign prompts; and the hazard direction (hazard minus benign tiers,
    Arditi et al.'s contrast) added at 4;
(b) the refusal direction ablated (projected out at layer 15), read on the prompts the base refused;
(c) the SAE's ``hazard_adjacent`` catalog latents ablated (error term kept), read on every tier.

Everything goes through the package (`bra.pipeline.build.build_store`, `bra.audit.score.score`,
`bra.audit.intervene.intervene`, `bra.audit.effects.effects`); a rerun with the same ``--work`` reuses every
complete store.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import logging  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import click  # noqa: E402
import yaml  # noqa: E402

logger = logging.getLogger("bench.effects")

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "manifests" / "eval-demo.yaml"
SCALES = (1.0, 2.0, 4.0)


def edits(scales: tuple[float, ...]) -> dict[str, list[str]]:
    """Study -> its edits, each followed by its random control."""
    def pair(spec: str) -> list[str]:
        return [spec, f"{spec}:random=0"]

    return {
        "a": [e for s in scales for e in pair(f"add={s:g}:direction=refusal")]
        + pair("add=4:direction=hazard"),
        "b": pair("ablate:direction=refusal"),
        "c": pair("ablate:category=hazard_adjacent"),
    }


def write_manifest(work: Path, max_new_tokens: int, batch_size: int) -> Path:
    """The eval-demo manifest with short completions in larger generation batches (fewer decode steps on a
    CPU), its prompt set by absolute path."""
    data = yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))
    data["name"] = f"eval-demo-effects-{max_new_tokens}"
    data["prompt_sets"] = [str((MANIFEST.parent / p).resolve()) for p in data["prompt_sets"]]
    data["generation"]["max_new_tokens"] = max_new_tokens
    data["generation"]["batch_size"] = batch_size
    path = work / "manifest.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _pp(x: float) -> str:
    return f"{100 * x:+.1f}"


def _row(run: dict[str, Any], tier: str) -> str:
    r = next(x for x in run["rows"] if x["tier"] == tier)
    return (f"| `{run['spec']}` | {'random' if run['control'] else 'edit'} | {tier} | {r['n']} | "
            f"{100 * r['refusal_before']:.1f} | {100 * r['refusal_after']:.1f} | {_pp(r['delta'])} "
            f"[{_pp(r['ci'][0])}, {_pp(r['ci'][1])}] | {r['to_refuse']} | {r['from_refuse']} | "
            f"{r['labels_changed']} |")


LABELS = ("refuse", "comply", "partial", "hedge", "evade", "unknown")
HEADER = ["| edit | kind | tier | n | refusal before % | after % | Δ pp (95% CI) | → refuse | refuse → | "
          "labels changed |", "|---|---|---|---|---|---|---|---|---|---|"]


def render(doc: dict[str, Any], studies: dict[str, list[str]], facts: dict[str, Any]) -> str:
    """bench/results-effects.md."""
    runs = {r["spec"]: r for r in doc["runs"]}
    refused = [p for p in doc["prompts"] if p["before"] == "refuse"]
    lines = ["# Causal checks on the demo model (issue 17)", "",
             f"Command: `{facts['command']}` ({facts['minutes']:.0f} min on {facts['threads']} CPU threads; "
             f"{facts['n_prompts']} prompts, max_new_tokens {facts['max_new_tokens']}, greedy, generation "
             f"batches of {facts['batch_size']}).", "",
             f"Model {facts['model']}, edits at layer {facts['layer']} (block output, every position), SAE "
             f"`{facts['sae']}`; base store unedited, same manifest. Surface labels: the phrase rules. "
             f"{doc['measure']}. Not reported: {doc['not_reported']}.", "",
             f"Directions: refusal = difference of means of refused minus complied prompts' residuals at the "
             f"last prompt token on the train split ({facts['refusal_counts']}), "
             f"norm {facts['refusal_norm']:.1f} "
             f"(mean residual norm there {facts['residual_norm']:.1f}); hazard = hazard minus benign tiers "
             f"({facts['hazard_counts']}), norm {facts['hazard_norm']:.1f}. Random controls: a seeded random "
             f"direction of the same norm; as many random SAE latents as the category has "
             f"({facts['n_hazard_latents']}).", "",
             f"Base refusal rate by tier: {facts['base_rates']}.", "",
             "## (a) Adding a direction, read on the benign prompts", "", *HEADER]
    lines += [_row(runs[s], "benign_bio") for s in studies["a"]]
    lines += ["", "All prompts:", "", *HEADER, *[_row(runs[s], "all") for s in studies["a"]], "",
              "## (b) Ablating the refusal direction, read on the prompts the base refused", ""]
    lines += [f"The base store refused {len(refused)} of {len(doc['prompts'])} prompts "
              f"({', '.join(p['id'] for p in refused) or 'none'}). After each edit:", "",
              "| edit | kind | still refused | labels after |", "|---|---|---|---|"]
    for s in studies["b"]:
        name = runs[s]["name"]
        after = [p["after"][name] for p in refused]
        lines.append(f"| `{s}` | {'random' if runs[s]['control'] else 'edit'} | "
                     f"{sum(a == 'refuse' for a in after)} of {len(refused)} | {', '.join(after) or '-'} |")
    lines += ["", "Every tier:", "", *HEADER]
    lines += [_row(runs[s], t) for s in studies["b"] for t in facts["tiers"]]
    lines += ["", "## (c) Ablating the hazard_adjacent catalog latents", "", *HEADER]
    lines += [_row(runs[s], t) for s in studies["c"] for t in facts["tiers"]]
    lines += ["", "## Surface labels after each edit (all 60 prompts)", "",
              "`unknown`: no phrase rule matched the completion (degenerate text lands there too; the "
              "completions are in each edited store's prompts.parquet).", "",
              "| edit | kind | " + " | ".join(LABELS) + " |", "|---|---|" + "---|" * len(LABELS),
              "| base | - | " + " | ".join(str(sum(p["before"] == c for p in doc["prompts"])) for c in LABELS)
              + " |"]
    for run in doc["runs"]:
        after = [p["after"][run["name"]] for p in doc["prompts"]]
        lines.append(f"| `{run['spec']}` | {'random' if run['control'] else 'edit'} | "
                     + " | ".join(str(after.count(c)) for c in LABELS) + " |")
    lines += ["", f"Edited SAE latents firing (share of the base store's layer-{facts['layer']} rows where "
              f"any of them is active): hazard_adjacent catalog {facts['firing_edit']:.1%}, its random "
              f"control {facts['firing_control']:.1%}.", ""]
    lines += ["", "Full table, per-prompt labels and the dose-response plot: `effects.md`, `effects.json`, "
              "`effects.png` in the work folder's `effects/`.", ""]
    return "\n".join(lines)


def _minutes(work: Path, t0: float, built_now: bool) -> float:
    """Wall minutes of the run that built the stores (kept in the work folder, so a rerun that reuses them
    reports the run that made them)."""
    record = work / "timing.json"
    if built_now or not record.is_file():
        record.write_text(json.dumps({"minutes": (time.perf_counter() - t0) / 60}), encoding="utf-8")
    return float(json.loads(record.read_text(encoding="utf-8"))["minutes"])


def _firing(store_path: Any, sae_path: str, latents: list[int]) -> float:
    """Share of the store's unmasked rows (the SAE's layer) where any of ``latents`` is active."""
    import torch

    from bra.cache.store import open_store
    from bra.sae.registry import load_sae_source

    sae = load_sae_source(sae_path)
    store = open_store(store_path)
    keep = ~store.read_rows("mask", 0, store.n_tokens)
    x = torch.from_numpy(store.read_acts(sae.cfg.layer, 0, store.n_tokens)[keep])
    with torch.no_grad():
        z = sae.encode(x)[:, latents]
    return float((z > 0).any(dim=1).float().mean())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("cache/effects-demo"),
              show_default=True, help="Stores, score run and effects (kept: a rerun reuses them).")
@click.option("--sae", default="/work/main/cache/runs/demo-sae", show_default=True, help="The demo SAE.")
@click.option("--max-new-tokens", type=int, default=24, show_default=True)
@click.option("--batch-size", type=int, default=30, show_default=True, help="Prompts per generate() call.")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=ROOT / "bench" / "results-effects.md", show_default=True)
def main(work: Path, sae: str, max_new_tokens: int, batch_size: int, threads: int, out: Path) -> None:
    """Run studies (a), (b), (c) and write the results file."""
    import torch

    from bra.audit.config import ScoreConfig
    from bra.audit.edits import InterveneConfig
    from bra.audit.effects import effects
    from bra.audit.intervene import intervene
    from bra.audit.score import score
    from bra.cache.store import open_store
    from bra.fsutil import write_text_atomic
    from bra.pipeline.build import build_store
    from bra.pipeline.manifest import load_manifest

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(write_manifest(work, max_new_tokens, batch_size))
    base = build_store(manifest, work / "base.zarr").path
    report = work / "score"
    if not (report / "catalog.json").is_file():
        score(base, sae, report, ScoreConfig(n_boot=200, n_perm=200))
    studies = edits(SCALES)
    specs = [s for group in studies.values() for s in group]
    cfg = InterveneConfig(edits=tuple(specs), sae=sae, catalog=str(report), base_store=str(base))
    built = intervene(manifest, work / "edits", cfg)
    doc = effects(base, [r.path for _, r in built], work / "effects")
    minutes = _minutes(work, t0, any(r.status != "already-complete" for _, r in built))
    records = {item.spec.text: item.edit.record for item, _ in built}
    table = open_store(base).read_table("prompts.parquet")
    tiers = [r["tier"] for r in doc["runs"][0]["rows"]]
    rates = doc["runs"][0]["rows"]
    refusal = records["ablate:direction=refusal"]["direction"]
    hazard = records["add=4:direction=hazard"]["direction"]
    facts = {"command": " ".join(["python -m bench.effects", *map(shlex.quote, sys.argv[1:])]),
             "minutes": minutes, "threads": threads, "n_prompts": len(table),
             "max_new_tokens": max_new_tokens, "batch_size": batch_size, "model": manifest.model.id,
             "layer": manifest.layers[0],
             "sae": sae, "tiers": tiers,
             "refusal_counts": f"{refusal['n_positive']} refused, {refusal['n_negative']} complied",
             "hazard_counts": f"{hazard['n_positive']} hazard, {hazard['n_negative']} benign",
             "refusal_norm": refusal["norm"], "hazard_norm": hazard["norm"],
             "residual_norm": refusal["mean_residual_norm"],
             "n_hazard_latents": records["ablate:category=hazard_adjacent"]["n_latents"],
             "firing_edit": _firing(base, sae, records["ablate:category=hazard_adjacent"]["latents"]),
             "firing_control": _firing(base, sae,
                                       records["ablate:category=hazard_adjacent:random=0"]["latents"]),
             "base_rates": ", ".join(f"{r['tier']} {100 * r['refusal_before']:.1f}% ({r['n']})"
                                     for r in rates)}
    write_text_atomic(out, render(doc, studies, facts))
    logger.info("wrote %s (the stores took %.1f min)", out, minutes)


if __name__ == "__main__":
    main()
