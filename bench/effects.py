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

``--organism DIR`` (e.g. the shallow SmolLM2 organism, cache/organisms/smollm2-L15/shallow): the same
studies on a model organism with the validation prompts (manifests/validate-shallow.yaml, plain variant
only: 40 hazard-tier + 20 benign prompts, max_new_tokens 24), seven or eight edited stores (refusal
direction added at 1, 2, 4, with ``--control-a`` a random direction of the same norm at 4; ablated,
beside its random direction; the hazard_adjacent latents ablated, beside firing-rate-matched random
latents), and `effects` given the SAE,
so D and the depth score are compared under the base store's one fit. It writes its own section of
``--out`` (between ``<!-- organism -->`` markers; the demo tables are left as they are).

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


ORGANISM_MANIFEST = ROOT / "manifests" / "validate-shallow.yaml"
ORGANISM_BEGIN, ORGANISM_END = "<!-- organism -->", "<!-- /organism -->"


def organism_edits(scales: tuple[float, ...], control_a: bool) -> dict[str, list[str]]:
    """Study -> its edits on an organism: seven stores, eight with the random direction of (a) at the
    largest scale (``control_a``; the 2026-12-02 run had no CPU time left for it)."""
    top = f"add={max(scales):g}:direction=refusal"
    control = [f"{top}:random=0"] if control_a else []
    return {"a": [f"add={s:g}:direction=refusal" for s in scales] + control,
            "b": ["ablate:direction=refusal", "ablate:direction=refusal:random=0"],
            "c": ["ablate:category=hazard_adjacent", "ablate:category=hazard_adjacent:random=0"]}


def write_organism_manifest(work: Path, organism: Path) -> Path:
    """manifests/validate-shallow.yaml with the plain variant only, the organism and prompt set by absolute
    path. A work folder's manifest of the same organism is kept as it is (its stores' fingerprints name
    it: a rerun from another checkout, whose prompt-set path differs, still reuses them)."""
    path = work / "manifest.yaml"
    if path.is_file() and (yaml.safe_load(path.read_text(encoding="utf-8")).get("model") or {}).get("id") \
            == str(organism.resolve()):
        return path
    data = yaml.safe_load(ORGANISM_MANIFEST.read_text(encoding="utf-8"))
    data["name"] = "effects-shallow" if organism.name == "shallow" else f"effects-{organism.name}"
    data["model"]["id"] = str(organism.resolve())
    data["prompt_sets"] = [str((ORGANISM_MANIFEST.parent / p).resolve()) for p in data["prompt_sets"]]
    data["generation"].pop("variants", None)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


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


def _label_counts(doc: dict[str, Any]) -> list[str]:
    """The table of surface-label counts: the base store's, then each edited store's."""
    lines = ["| edit | kind | " + " | ".join(LABELS) + " |", "|---|---|" + "---|" * len(LABELS),
             "| base | - | " + " | ".join(str(sum(p["before"] == c for p in doc["prompts"])) for c in LABELS)
             + " |"]
    for run in doc["runs"]:
        after = [p["after"][run["name"]] for p in doc["prompts"]]
        lines.append(f"| `{run['spec']}` | {'random' if run['control'] else 'edit'} | "
                     + " | ".join(str(after.count(c)) for c in LABELS) + " |")
    return lines


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
              "completions are in each edited store's prompts.parquet).", "", *_label_counts(doc)]
    lines += ["", f"Edited SAE latents firing (share of the base store's layer-{facts['layer']} rows where "
              f"any of them is active): hazard_adjacent catalog {facts['firing_edit']:.1%}, its random "
              f"control {facts['firing_control']:.1%}.", ""]
    lines += ["", "Full table, per-prompt labels and the dose-response plot: `effects.md`, `effects.json`, "
              "`effects.png` in the work folder's `effects/`.", ""]
    return "\n".join(lines)


def _ci(m: dict[str, Any]) -> str:
    if m["delta"] is None:
        return "- | - | -"
    lo, hi = m["ci"]
    return f"{m['before']:.3f} | {m['after']:.3f} | {m['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _audit_row(run: dict[str, Any], tier: str) -> str:
    r = next(x for x in run["audit_rows"] if x["tier"] == tier)
    return (f"| `{run['spec']}` | {'random' if run['control'] else 'edit'} | {tier} | "
            f"{_ci(r['depth_score'])} | {r['depth_score']['n_paired']} | {_ci(r['D'])} | "
            f"{r['D']['n_paired']} |")


AUDIT_HEADER = ["| edit | kind | rows | depth before | after | Δ (95% CI) | n | D before | after "
                "| Δ (95% CI) | n |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]


def render_organism(doc: dict[str, Any], studies: dict[str, list[str]], facts: dict[str, Any]) -> str:
    """The organism section of bench/results-effects.md."""
    runs = {r["spec"]: r for r in doc["runs"]}
    refused = [p for p in doc["prompts"] if p["before"] == "refuse"]
    hazard_tier = next(t for t in facts["tiers"] if t != "benign_bio" and t != "all")
    a = doc["audit"]
    lines = [ORGANISM_BEGIN, f"# Causal checks on the {facts['organism']} organism (issue 17)", "",
             f"Command: `{facts['command']}` ({facts['date']}; the stores took {facts['minutes']:.0f} min of "
             f"wall time on {facts['threads']} CPU threads shared with other jobs, load average "
             f"{facts['load']}; {facts['n_prompts']} prompts, max_new_tokens {facts['max_new_tokens']}, "
             f"greedy). The stores were built by the same package calls as `bra-sae intervene` and "
             f"`bra-sae effects --sae` make.", "",
             f"Model `{facts['model']}` (provenance: refusal trained above block {facts['layer']} only, so "
             f"its block-{facts['layer']} residual is bitwise the base SmolLM2's), edits at layer "
             f"{facts['layer']} "
             f"(block output, every position), SAE `{facts['sae']}` (trained on the base model's corpus "
             f"store). Prompts: manifests/data/eval-validate.jsonl (plain variant only). Surface labels: the "
             f"phrase rules. {doc['measure']}.", "",
             f"Refusal direction: refused minus complied prompts' residuals at the last prompt token on the "
             f"train split ({facts['refusal_counts']}), norm {facts['refusal_norm']:.1f} (mean residual norm "
             f"there {facts['residual_norm']:.1f}). Since the residual here is the base model's and the "
             f"organism refuses the hazard tier, this is essentially the base model's hazard-vs-benign "
             f"direction. Random controls: a seeded random direction of the same norm; for the "
             f"{facts['n_hazard_latents']} hazard_adjacent latents, as many random latents matched on "
             f"firing rate on the base store (edited {facts['firing_edit']:.1%} of rows, control "
             f"{facts['firing_control']:.1%}; a uniform draw would average "
             f"{facts['firing_uniform']:.1%}).", "",
             f"Base refusal rate by tier: {facts['base_rates']}.", "",
             "## (a) Adding the refusal direction, read on the benign prompts", "", *HEADER]
    lines += [_row(runs[s], "benign_bio") for s in studies["a"]]
    lines += ["", "## (b) Ablating the refusal direction, read on the prompts the base refused", "",
              f"The base store refused {len(refused)} of {len(doc['prompts'])} prompts. After each edit:", "",
              "| edit | kind | still refused | labels after (counts) |", "|---|---|---|---|"]
    for s in studies["b"]:
        after = [p["after"][runs[s]["name"]] for p in refused]
        counts = ", ".join(f"{c} {after.count(c)}" for c in LABELS if after.count(c))
        lines.append(f"| `{s}` | {'random' if runs[s]['control'] else 'edit'} | "
                     f"{sum(x == 'refuse' for x in after)} of {len(refused)} | {counts} |")
    lines += ["", *HEADER, *[_row(runs[s], t) for s in studies["b"] for t in (hazard_tier, "all")]]
    lines += ["", "## (c) Ablating the hazard_adjacent catalog latents", "", *HEADER]
    lines += [_row(runs[s], t) for s in studies["c"] for t in facts["tiers"]]
    lines += ["", "## Surface labels after each edit (all prompts)", "", *_label_counts(doc)]
    scale = a["depth_scale"]
    lines += ["", "## D and depth score under the base store's one fit", "", a["measure"] + ".", "",
              f"The fit: {len(a['hazard_latents'])} hazard_adjacent latents; D threshold "
              f"{'none' if a['d_threshold'] is None else format(a['d_threshold'], '.3f')}; depth scale "
              f"{'usable' if scale['usable'] else 'unusable'} (reference {scale['reference']}, t_deep "
              f"{scale['t_deep']}, t_shallow {scale['t_shallow']}); prompts per split "
              f"{a['n_per_split']}.", "",
              *AUDIT_HEADER]
    lines += [_audit_row(run, t) for run in doc["runs"]
              for t in (hazard_tier, "benign_bio", "all (test split)")]
    lines += ["", "Transitions over all prompts (depth category; D-rule verdict of a refusal):", "",
              "| edit | kind | depth category | D-rule verdict |", "|---|---|---|---|"]
    for run in doc["runs"]:
        r = next(x for x in run["audit_rows"] if x["tier"] == "all")
        cat = "; ".join(f"{k}: {v}" for k, v in r["category_transitions"].items()) or "none"
        dv = "; ".join(f"{k}: {v}" for k, v in r["d_verdict_transitions"].items()) or "none"
        lines.append(f"| `{run['spec']}` | {'random' if run['control'] else 'edit'} | {cat} | {dv} |")
    lines += ["", "Full tables, per-prompt labels and the plot: `effects.md`, `effects.json`, `effects.png` "
              "in the work folder's `effects/`.", ORGANISM_END, ""]
    return "\n".join(lines)


def _splice(old: str, section: str) -> str:
    """``old`` with its organism section replaced by ``section`` (appended when it has none)."""
    if ORGANISM_BEGIN in old and ORGANISM_END in old:
        head, _, rest = old.partition(ORGANISM_BEGIN)
        return head + section.rstrip("\n") + rest.partition(ORGANISM_END)[2]
    return old.rstrip("\n") + "\n\n" + section


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
@click.option("--organism", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="A model organism folder (e.g. cache/organisms/smollm2-L15/shallow): run the studies on "
                   "it with the validation prompts and write its section of --out.")
@click.option("--control-a/--no-control-a", default=True, show_default=True,
              help="With --organism: also the random direction beside (a)'s largest scale (one more store).")
def main(work: Path, sae: str, max_new_tokens: int, batch_size: int, threads: int, out: Path,
         organism: Path | None, control_a: bool) -> None:
    """Run studies (a), (b), (c) and write the results file."""
    import torch

    if organism is not None:
        run_organism(work, organism, sae, threads, out, control_a)
        return

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


def _span_minutes(work: Path, t_start: float, built_now: bool) -> float:
    """Wall minutes from the first run that started building this work folder's stores to the last run
    that built one (``timing.json``: started, finished, epoch seconds), so a resumed or reused run reports
    the whole span, interruptions included."""
    record = work / "timing.json"
    span = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
    span.setdefault("started", t_start)
    if built_now or "finished" not in span:
        span["finished"] = time.time()
    record.write_text(json.dumps(span), encoding="utf-8")
    return (span["finished"] - span["started"]) / 60


def run_organism(work: Path, organism: Path, sae: str, threads: int, out: Path, control_a: bool) -> None:
    """The studies on an organism (module doc); writes its section of ``out``."""
    import datetime

    import torch

    from bra.audit.config import ScoreConfig
    from bra.audit.edits import EffectsConfig, InterveneConfig
    from bra.audit.effects import effects
    from bra.audit.intervene import intervene
    from bra.audit.score import score
    from bra.fsutil import write_text_atomic
    from bra.pipeline.build import build_store
    from bra.pipeline.manifest import load_manifest

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    torch.set_num_threads(threads)
    t_start = time.time()
    load_start = os.getloadavg()
    work.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(write_organism_manifest(work, organism))
    base = build_store(manifest, work / "base.zarr").path
    report = work / "score"
    if not (report / "catalog.json").is_file():
        score(base, sae, report, ScoreConfig(n_boot=200, n_perm=200))
    studies = organism_edits(SCALES, control_a)
    specs = [e for group in studies.values() for e in group]
    cfg = InterveneConfig(edits=tuple(specs), sae=sae, catalog=str(report), base_store=str(base))
    built = intervene(manifest, work / "edits", cfg)
    doc = effects(base, [r.path for _, r in built], work / "effects", EffectsConfig(sae=sae))
    minutes = _span_minutes(work, t_start, any(r.status != "already-complete" for _, r in built))
    records = {item.spec.text: item.edit.record for item, _ in built}
    refusal = records["ablate:direction=refusal"]["direction"]
    match = records["ablate:category=hazard_adjacent:random=0"]["matched_firing"]
    rates = doc["runs"][0]["rows"]
    load_end = os.getloadavg()
    facts = {"command": " ".join(["python -m bench.effects", *map(shlex.quote, sys.argv[1:])]),
             "organism": organism.name,
             "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
             "load": f"{load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end (1-min; 2 cores)",
             "minutes": minutes, "threads": threads, "n_prompts": len(doc["prompts"]),
             "max_new_tokens": manifest.generation.max_new_tokens, "model": manifest.model.id,
             "layer": manifest.layers[0], "sae": sae, "tiers": [r["tier"] for r in rates],
             "refusal_counts": f"{refusal['n_positive']} refused, {refusal['n_negative']} complied",
             "refusal_norm": refusal["norm"], "residual_norm": refusal["mean_residual_norm"],
             "n_hazard_latents": records["ablate:category=hazard_adjacent"]["n_latents"],
             "firing_edit": match["edited_mean"], "firing_control": match["control_mean"],
             "firing_uniform": match["uniform_mean"],
             "base_rates": ", ".join(f"{r['tier']} {100 * r['refusal_before']:.1f}% ({r['n']})"
                                     for r in rates)}
    old = out.read_text(encoding="utf-8") if out.is_file() else ""
    write_text_atomic(out, _splice(old, render_organism(doc, studies, facts)))
    logger.info("wrote the %s section of %s (the stores took %.1f min)", organism.name, out, minutes)


if __name__ == "__main__":
    main()
