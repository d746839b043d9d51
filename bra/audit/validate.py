"""`bra-sae validate`: score the eval stores of the base model and the model organisms (plain and prefilled)
with one SAE and write validation/report.{json,md} and its plots (`bra.audit.validation` computes the
tables). An organism trained on any of the audited prompts is refused, naming them.

Two fits, both reported:
- **reference fit** (``--reference NAME``, `make validate`: the base model): the audit is fit once on that
  run's plain store (catalog on its training split; D threshold, magnitude floor and depth scale on its
  calibration split; the raw baseline's direction and scale likewise) and applied unchanged to every store,
  on the reference's split of the same prompts. An organism's own store cannot calibrate its depth scale
  (the scale's hazard reference is complied hazard answers, which a refusing organism barely gives, and RMU
  moves the prompt-segment fallback too), and one scale makes the organisms' scores comparable: the base
  model's own hazard processing is 1, its benign answers 0.
- **own fit**: every store scored exactly as `bra-sae score` would (its own split, catalog, calibration).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from bra.audit.config import SPLITS, ScoreConfig, ScoreResult
from bra.audit.depth import fit_depth_scale
from bra.audit.effects_audit import FixedAudit
from bra.audit.fixed_fit import AuditRows, apply_fit
from bra.audit.report import json_ready
from bra.audit.score import compute_scores, raw_direction, raw_evidence
from bra.audit.validation import SCORES, refused_positive, render_markdown, score_columns, validation_report
from bra.errors import BraError
from bra.fsutil import atomic_dir, is_foreign_output

logger = logging.getLogger(__name__)

REPORT_JSON, REPORT_MD = "report.json", "report.md"
PLOTS = {"refusal": "refusal_rates.png", "depth": "depth_scores.png"}


def machine() -> str:
    """CPU model, core count, Python and platform, for the report header."""
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def check_organism(result: ScoreResult) -> None:
    """Refuse an organism folder that lacks its provenance or was trained on a prompt of this store."""
    model = result.facts.model_id
    if model is None or not Path(model).is_dir():
        return
    from bra.organism.provenance import check_audit_prompts, is_organism

    if is_organism(model):
        check_audit_prompts(model, result.table["id"].astype(str).tolist())


class ReferenceFit:
    """One run's fit of the audit (`FixedAudit`) plus the raw baseline's direction and scale fit the same
    way, applied to any store of the same prompts."""

    def __init__(self, name: str, store: str, sae: str, cfg: ScoreConfig) -> None:
        self.name, self.store = name, store
        self.fixed = FixedAudit(store, sae, cfg)
        bundle = self.fixed.bundle
        rows = AuditRows.of(bundle, self.fixed.classes)
        train, cal = (self.fixed.split == s for s in SPLITS[:2])
        self.direction = raw_direction(bundle, train, rows)
        raw_c, raw_p = raw_evidence(bundle, self.direction)
        self.raw_scale = fit_depth_scale(raw_c, raw_p, cal, rows.positive, rows.negative, rows.labels,
                                         cfg.depth_quantile, cfg.min_reference)
        self.split_of = dict(zip(self.fixed.ids.tolist(), self.fixed.split.tolist(), strict=True))

    def scored(self, own: ScoreResult, store: str) -> ScoreResult:
        """``own`` (the store's own scoring) with every fitted quantity replaced by this fit's, applied to
        the store's rows; the split is the reference's for the same prompt ids."""
        bundle = self.fixed.read(store)
        ids = bundle.table["id"].astype(str).tolist()
        missing = [i for i in ids if i not in self.split_of]
        if missing or ids != own.table["id"].astype(str).tolist():
            which = ", ".join(missing[:5]) or "(their order)"
            raise BraError(f"{store}: prompts {which} differ from the reference run {self.name!r} "
                           f"({self.store}); a reference fit needs the same prompts")
        applied = apply_fit(self.fixed.fit, AuditRows.of(bundle, self.fixed.classes))
        raw_c, _ = raw_evidence(bundle, self.direction)
        return dataclasses.replace(
            own, split=np.array([self.split_of[i] for i in ids]), D=applied.D,
            depth_score=applied.depth_score, prompt_depth_score=applied.prompt_depth_score,
            verdicts=applied.verdicts, verdict_reasons=applied.reasons, scale=self.fixed.fit.scale,
            catalog=dict(self.fixed.fit.catalog),
            raw_depth_score=self.raw_scale.score(raw_c), raw_scale=self.raw_scale)

    def to_json(self) -> dict[str, Any]:
        """What the fit is (report.json)."""
        return {"run": self.name, "store": self.store, **self.fixed.to_json(),
                "raw_scale": self.raw_scale.to_json()}


def run_validation(runs: Mapping[str, tuple[str, str | None]], sae: str, out: str | os.PathLike[str],
                   cfg: ScoreConfig | None = None, command: str = "bra-sae validate",
                   reference: str | None = None) -> dict[str, Any]:
    """``runs``: name -> (plain store, prefill store or None); ``reference``: the run whose plain store's fit
    is applied to every store (None: own fits only). Returns report.json's contents."""
    cfg = cfg or ScoreConfig(repeats=1)
    out = Path(out)
    if is_foreign_output(out, REPORT_JSON):
        raise BraError(f"{out} exists and is not a validation report; pick an empty or new --out")
    if reference is not None and reference not in runs:
        raise BraError(f"--reference {reference}: no run of that name (runs: {', '.join(runs)})")
    results: dict[str, dict[str, ScoreResult | None]] = {}
    for name, (plain, prefill) in runs.items():
        logger.info("scoring %s: %s%s", name, plain, f" and {prefill}" if prefill else "")
        r = compute_scores(plain, sae, cfg)
        check_organism(r)
        results[name] = {"plain": r, "prefill": compute_scores(prefill, sae, cfg) if prefill else None}
    report = validation_report(results, cfg.n_boot, cfg.seed)
    headline = results
    if reference is not None:
        ref = ReferenceFit(reference, runs[reference][0], sae, cfg)
        headline = {name: {kind: None if r is None else ref.scored(r, runs[name][0 if kind == "plain" else 1])
                           for kind, r in by.items()} for name, by in results.items()}
        report = {**validation_report(headline, cfg.n_boot, cfg.seed), "own_fit": report,
                  "reference_fit": ref.to_json()}
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report["meta"] = {"command": command, "machine": machine(), "date": when, "sae": sae,
                      "stores": {k: list(v) for k, v in runs.items()}, "settings": json_ready(cfg.__dict__)}
    header = (f"# Known-depth validation\n\nCommand: `{command}`  \nMachine: {report['meta']['machine']}  \n"
              f"Date: {when}  \nSAE: `{sae}`. AUROCs on the test split's refused hazard-tier prompts.")
    own = ("Each store scored as `bra-sae score` does (its own group split, FDR catalog and calibration; "
           f"repeats {cfg.repeats}).")
    if reference is not None:
        fit = report["reference_fit"]
        body = render_markdown(json_ready(report), header + "\n\n" + (
            f"**Reference fit**: the audit fit once on run `{reference}`'s plain store (catalog of "
            f"{len(fit['hazard_latents'])} hazard latents on its training split; depth scale, D threshold "
            f"and the raw baseline on its calibration split) and applied unchanged to every store, on its "
            f"split of the same prompts.")) + "\n" + render_markdown(
            json_ready(report["own_fit"]), "# The same stores, each on its own fit\n\n" + own)
    else:
        body = render_markdown(json_ready(report), header + "\n\n" + own)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        (tmp / REPORT_JSON).write_text(json.dumps(json_ready(report), indent=2) + "\n")
        figures = f"\n![refusal rates]({PLOTS['refusal']})\n![depth scores]({PLOTS['depth']})\n"
        (tmp / REPORT_MD).write_text(body + figures)
        _plot_refusal(report).savefig(tmp / PLOTS["refusal"], dpi=110)
        _plot_depth(headline).savefig(tmp / PLOTS["depth"], dpi=110)
    return json_ready(report)


def _plot_refusal(report: Mapping[str, Any]) -> Figure:
    """Refusal rate per organism, tier and variant with Wilson intervals."""
    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = fig.subplots()
    bars = [(f"{o}\n{v}", t, c) for o, e in report["organisms"].items() for v, by in e["refusal"].items()
            for t, c in by.items()]
    tiers = sorted({t for _, t, _ in bars})
    groups = list(dict.fromkeys(g for g, _, _ in bars))
    width = 0.8 / max(len(tiers), 1)
    for j, t in enumerate(tiers):
        cells = {g: c for g, tt, c in bars if tt == t}
        x = np.arange(len(groups)) + j * width
        y = np.array([cells[g]["rate"] if g in cells else np.nan for g in groups], dtype=float)
        lo = np.array([cells[g]["ci_low"] if g in cells else np.nan for g in groups], dtype=float)
        hi = np.array([cells[g]["ci_high"] if g in cells else np.nan for g in groups], dtype=float)
        ax.bar(x, y, width, label=t, yerr=[y - lo, hi - y], capsize=2)
    ax.set_xticks(np.arange(len(groups)) + width * (len(tiers) - 1) / 2, groups, fontsize=8)
    ax.set_ylabel("refusal rate (95% Wilson)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    return fig


def _plot_depth(results: Mapping[str, Mapping[str, ScoreResult | None]]) -> Figure:
    """Each score of the refused hazard-tier test prompts, per organism (plain runs)."""

    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, len(SCORES))
    rng = np.random.default_rng(0)
    for ax, (key, title) in zip(axes, SCORES.items(), strict=True):
        for i, r in enumerate(results.values()):
            plain = r["plain"]
            assert plain is not None
            v = score_columns(plain)[key][refused_positive(plain)]
            v = v[np.isfinite(v)]
            ax.scatter(i + rng.uniform(-0.15, 0.15, v.size), v, s=16, alpha=0.8)
        ax.set_xticks(range(len(results)), list(results), fontsize=8)
        ax.set_title(title, fontsize=9)
    return fig


__all__ = ["machine", "run_validation"]
