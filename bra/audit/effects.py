"""`bra-sae effects BASE_STORE EDITED_STORE...`: what the edits of `bra-sae intervene` changed, read from
the stores' prompts tables and, given the audit's SAE (``--sae``), their activations.

Per prompt: its surface label before (BASE_STORE) and after (each edited store), matched by prompt id. Per
edited store and tier: the refusal rate (share labelled ``refuse``; ``unknown`` counts as not refused)
before and after and its change, with a paired bootstrap CI (the same prompts resampled on both sides,
within each tier; the "all" row resamples within every tier, so its tier mix is fixed). The random
controls sit beside the edit they control (the same spec without ``:random=SEED``). Edits that differ only
in their number (`bra.audit.edits.EditSpec.family`) form a dose-response series, plotted against it.

With ``--sae``: the change in D and in the depth score, under ONE fit of the audit on the base store
applied unchanged to every edited store (`bra.audit.effects_audit`), and the transitions of the depth
categories and of the D rule's verdicts. Without it, labels only (the outputs say so).

Outputs (written together, `bra.fsutil.atomic_dir`): effects.json, effects.md, effects.png.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bra.audit.config import ScoreConfig
from bra.audit.edits import EffectsConfig
from bra.audit.labels import choose_labels
from bra.audit.reader import read_prompts
from bra.errors import EditError
from bra.fsutil import atomic_dir, is_foreign_output
from bra.vocab import EVAL_TIERS, REFUSE

logger = logging.getLogger(__name__)

EFFECTS_JSON, EFFECTS_MD, EFFECTS_PNG = "effects.json", "effects.md", "effects.png"
ALL = "all"
"""The row of every prompt together."""
NO_SAE = ("change in D and in the depth score: not computed, because no --sae was given (they need the "
          "audit's SAE to read the stores' activations)")


@dataclass(frozen=True)
class _Side:
    path: str
    name: str
    edit: dict[str, Any] | None
    manifest: dict[str, Any] | None
    table: pd.DataFrame


def _read(path: str | os.PathLike[str], labels: str) -> _Side:
    where, edit, manifest, table = read_prompts(path)
    table, _ = choose_labels(table, labels, where)
    name = Path(where.rstrip("/")).name.removesuffix(".zarr")
    return _Side(where, name, edit, manifest, table)


def paired_bootstrap(before: np.ndarray, after: np.ndarray, strata: np.ndarray, n_boot: int,
                     rng: np.random.Generator, level: float = 0.95) -> tuple[float, float, float]:
    """(mean(after) - mean(before), lo, hi): the change in a rate over paired 0/1 outcomes [n] with a
    percentile CI from resampling prompts (both sides together) with replacement within each stratum."""
    diff = after.astype(np.float64) - before.astype(np.float64)
    if not len(diff):
        return float("nan"), float("nan"), float("nan")
    sums = np.zeros(n_boot)
    for s in np.unique(strata):
        d = diff[strata == s]
        sums += d[rng.integers(0, len(d), (n_boot, len(d)))].sum(axis=1)
    boots = sums / len(diff)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return float(diff.mean()), float(lo), float(hi)


def _tier_order(tiers: Sequence[str]) -> list[str]:
    present = set(tiers)
    return [t for t in EVAL_TIERS if t in present] + sorted(present - set(EVAL_TIERS))


def _rows(before: pd.Series, after: pd.Series, tiers: np.ndarray, cfg: EffectsConfig) -> list[dict[str, Any]]:
    """One row per tier, then ``all``."""
    rng = np.random.default_rng(cfg.seed)
    b, a = before.to_numpy() == REFUSE, after.to_numpy() == REFUSE
    out = []
    for tier in [*_tier_order(list(tiers)), ALL]:
        sel = np.ones(len(b), bool) if tier == ALL else tiers == tier
        delta, lo, hi = paired_bootstrap(b[sel], a[sel], tiers[sel], cfg.n_boot, rng)
        out.append({"tier": tier, "n": int(sel.sum()), "refusal_before": float(b[sel].mean()),
                    "refusal_after": float(a[sel].mean()), "delta": delta, "ci": [lo, hi],
                    "to_refuse": int((~b[sel] & a[sel]).sum()), "from_refuse": int((b[sel] & ~a[sel]).sum()),
                    "labels_changed": int((before.to_numpy()[sel] != after.to_numpy()[sel]).sum())})
    return out


def _check_pair(base: _Side, edited: _Side) -> None:
    if edited.edit is None:
        raise EditError(f"{edited.path}: not an edited store (no edit in its attrs); make one with "
                        f"`bra-sae intervene`")
    if base.manifest != edited.manifest:
        diff = sorted(k for k in set(base.manifest or {}) | set(edited.manifest or {})
                      if (base.manifest or {}).get(k) != (edited.manifest or {}).get(k))
        raise EditError(f"{edited.path} was generated from another manifest than {base.path} (differs in: "
                        f"{', '.join(diff) or '?'}); compare stores of one manifest")
    if sorted(base.table["id"]) != sorted(edited.table["id"]):
        raise EditError(f"{edited.path} and {base.path} hold different prompts")


def _ordered(sides: list[_Side]) -> list[_Side]:
    """Edits in the order given, each followed by its random controls."""
    real = [s for s in sides if not (s.edit or {}).get("control")]
    controls = [s for s in sides if (s.edit or {}).get("control")]
    out: list[_Side] = []
    for s in real:
        out += [s] + [c for c in controls if (c.edit or {}).get("pair") == (s.edit or {}).get("spec")]
    return out + [c for c in controls if c not in out]


def compute_effects(base_path: str | os.PathLike[str], edited_paths: Sequence[str | os.PathLike[str]],
                    cfg: EffectsConfig | None = None, score_cfg: ScoreConfig | None = None) -> dict[str, Any]:
    """The comparison as JSON (see the module doc); reads the stores, writes nothing. ``score_cfg``: the
    audit settings of the fit when ``cfg.sae`` is given (default: `bra-sae score`'s, with ``cfg``'s split
    seed and labels)."""
    cfg = cfg or EffectsConfig()
    if not edited_paths:
        raise EditError("give at least one EDITED_STORE after BASE_STORE")
    base = _read(base_path, cfg.labels)
    if base.edit is not None:
        raise EditError(f"BASE_STORE {base.path} was generated under an edit ({base.edit.get('spec')}); give "
                        f"the unedited store")
    sides = [_read(p, cfg.labels) for p in edited_paths]
    for side in sides:
        _check_pair(base, side)
    before = base.table.set_index("id")
    tiers = before["tier"].astype(str).to_numpy()
    runs, per_prompt = [], {pid: {"id": pid, "tier": t, "before": lab, "after": {}}
                            for pid, t, lab in zip(before.index, tiers, before["surface_label"], strict=True)}
    audit = None
    if cfg.sae is not None:  # the base store's fit, once, before any edited store is read
        from bra.audit.effects_audit import FixedAudit

        audit = FixedAudit(base.path, cfg.sae,
                           score_cfg or ScoreConfig(seed=cfg.split_seed, labels=cfg.labels))
        if [str(i) for i in audit.ids] != [str(i) for i in before.index]:
            raise EditError(f"{base.path}: its prompts table and its activations disagree on the prompts")
    for side in _ordered(sides):
        after = side.table.set_index("id").loc[before.index, "surface_label"].astype(str)
        edit = side.edit or {}
        runs.append({"name": side.name, "store": side.path, "spec": edit.get("spec"),
                     "control": bool(edit.get("control")), "pair": edit.get("pair"),
                     "family": edit.get("family"), "dose": edit.get("dose"), "layer": edit.get("layer"),
                     "n_latents": edit.get("n_latents"),
                     "direction_norm": (edit.get("direction") or {}).get("norm"),
                     "rows": _rows(before["surface_label"].astype(str), after, tiers, cfg),
                     **({"matched_firing": edit["matched_firing"]} if edit.get("matched_firing") else {})})
        if audit is not None:
            runs[-1]["audit_rows"] = audit.rows(audit.apply(side.path), _tier_order(list(tiers)), cfg.n_boot,
                                                cfg.seed)
        for pid, lab in after.items():
            per_prompt[str(pid)]["after"][side.name] = lab
    return {"base": base.path, "labels": cfg.labels, "n_boot": cfg.n_boot, "seed": cfg.seed,
            "measure": "refusal rate = share of prompts whose surface label is 'refuse' (unknown counts as "
                       "not refused); CI: paired bootstrap over prompts within tiers, 95% percentile",
            "audit": None if audit is None else {**audit.to_json(), "sae": cfg.sae, "measure": AUDIT_MEASURE},
            "not_reported": None if audit is not None else NO_SAE, "runs": runs,
            "prompts": list(per_prompt.values())}


AUDIT_MEASURE = ("depth score and D of every store under ONE fit on the base store (catalog on its train "
                 "split; T, magnitude floor, D threshold and depth scale on its calibration split), applied "
                 "unchanged; means over the prompts finite before and after, Δ = mean paired change with "
                 "a 95% bootstrap CI; the test-split row holds only prompts the fit never read")


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}"


def effects_markdown(doc: dict[str, Any]) -> str:
    """The table (every run, controls beside their edit) and the prompts whose label changed."""
    lines = [f"# Effects of residual edits vs `{doc['base']}`", "", doc["measure"] + ".", "",
             *([f"Not reported: {doc['not_reported']}.", ""] if doc["not_reported"] else []),
             "| edit | control | tier | n | refusal before % | after % | Δ pp (95% CI) | → refuse | "
             "refuse → | labels changed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run in doc["runs"]:
        for r in run["rows"]:
            ci = f"{100 * r['delta']:+.1f} [{100 * r['ci'][0]:+.1f}, {100 * r['ci'][1]:+.1f}]"
            lines.append(f"| `{run['spec']}` | {'yes' if run['control'] else ''} | {r['tier']} | {r['n']} | "
                         f"{_pct(r['refusal_before'])} | {_pct(r['refusal_after'])} | {ci} | "
                         f"{r['to_refuse']} | {r['from_refuse']} | {r['labels_changed']} |")
    matched = [run for run in doc["runs"] if run.get("matched_firing")]
    if matched:
        lines += ["", "Random latent controls, matched on firing rate on the base store (mean share of rows "
                  "where a latent is active; `uniform` = what a uniform draw expects):", "",
                  "| control | edited | control | uniform |", "|---|---|---|---|"]
        for run in matched:
            m = run["matched_firing"]
            lines.append(f"| `{run['spec']}` | {m['edited_mean']:.1%} | {m['control_mean']:.1%} | "
                         f"{m['uniform_mean']:.1%} |")
    if doc["audit"] is not None:
        lines += ["", *audit_markdown(doc)]
    names = [run["name"] for run in doc["runs"]]
    changed = [p for p in doc["prompts"] if any(p["after"][n] != p["before"] for n in names)]
    lines += ["", f"## Prompts whose surface label changed ({len(changed)} of {len(doc['prompts'])})", ""]
    if changed:
        lines += ["| prompt | tier | before | " + " | ".join(f"`{n}`" for n in names) + " |",
                  "|---|---|---|" + "---|" * len(names)]
        lines += [f"| {p['id']} | {p['tier']} | {p['before']} | "
                  + " | ".join(p["after"][n] if p["after"][n] != p["before"] else "=" for n in names) + " |"
                  for p in changed]
    return "\n".join(lines) + "\n"


def _mean_cell(m: dict[str, Any]) -> str:
    if m["delta"] is None:
        return "- | - | -"
    lo, hi = m["ci"]
    ci = "" if lo != lo else f" [{lo:+.3f}, {hi:+.3f}]"
    return f"{m['before']:.3f} | {m['after']:.3f} | {m['delta']:+.3f}{ci}"


def _transitions_cell(t: dict[str, int]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in t.items()) or "none"


def audit_markdown(doc: dict[str, Any]) -> list[str]:
    """The D / depth-score table under the base store's fit and the transitions."""
    a = doc["audit"]
    scale = a["depth_scale"]
    thr = "none" if a["d_threshold"] is None else f"{a['d_threshold']:.3f}"
    lines = ["## D and depth score under the base store's fit", "", a["measure"] + ".", "",
             f"The fit (SAE `{a['sae']}`, split seed {a['split_seed']}, prompts per split "
             f"{a['n_per_split']}): "
             f"{len(a['hazard_latents'])} hazard_adjacent latents"
             + (f" ({a['hazard_reason']})" if a["hazard_reason"] else "")
             + f"; D threshold {thr} (from {a['n_threshold_fit']} calibration prompts); depth scale "
             + ("usable" if scale["usable"] else "unusable")
             + f" (reference {scale['reference']}" + (f"; {scale['note']}" if scale["note"] else "") + ").",
             "", "| edit | control | tier | n | depth before | after | Δ (95% CI) | n paired | D before "
             "| after | Δ (95% CI) | n paired |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in doc["runs"]:
        for r in run.get("audit_rows", []):
            d, m = r["depth_score"], r["D"]
            lines.append(f"| `{run['spec']}` | {'yes' if run['control'] else ''} | {r['tier']} | {r['n']} | "
                         f"{_mean_cell(d)} | {d['n_paired']} | {_mean_cell(m)} | {m['n_paired']} |")
    lines += ["", "Transitions (all prompts): depth category of each prompt, and the D rule's verdict of a "
              "refusal (`not refused` for the rest).", "",
              "| edit | control | depth category | D-rule verdict |",
              "|---|---|---|---|"]
    for run in doc["runs"]:
        r = next((x for x in run.get("audit_rows", []) if x["tier"] == ALL), None)
        if r is not None:
            lines.append(f"| `{run['spec']}` | {'yes' if run['control'] else ''} | "
                         f"{_transitions_cell(r['category_transitions'])} | "
                         f"{_transitions_cell(r['d_verdict_transitions'])} |")
    return lines


def effects_plot(doc: dict[str, Any]) -> Any:
    """Dose-response: the refusal-rate change (with its CI) against each family's number, one panel per
    tier and one for all prompts; controls dashed."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state to close

    tiers = [r["tier"] for r in doc["runs"][0]["rows"]]
    fig = Figure(figsize=(4.2 * len(tiers), 3.6))
    axes = fig.subplots(1, len(tiers), squeeze=False, sharey=True)
    families = list(dict.fromkeys(run["family"] for run in doc["runs"]))
    for ax, tier in zip(axes[0], tiers, strict=True):
        for k, family in enumerate(families):
            runs = sorted((r for r in doc["runs"] if r["family"] == family), key=lambda r: r["dose"])
            row = [next(x for x in r["rows"] if x["tier"] == tier) for r in runs]
            x = np.array([r["dose"] for r in runs], dtype=float)
            y = np.array([100 * r["delta"] for r in row])
            err = np.array([[100 * (r["delta"] - r["ci"][0]) for r in row],
                            [100 * (r["ci"][1] - r["delta"]) for r in row]])
            ax.errorbar(x + 0.02 * k * (np.ptp(x) or 1), y, yerr=err, marker="o", capsize=3, label=family,
                        linestyle="--" if runs[0]["control"] else "-")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(tier, fontsize=9)
        ax.set_xlabel("scale / value (ablate = 0)")
    axes[0][0].set_ylabel("refusal rate change (pp, 95% CI)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _refuse_foreign_out(out: Path) -> None:
    if is_foreign_output(out, EFFECTS_JSON):
        raise EditError(f"{out} exists and is not an effects output directory; pick an empty or new --out")


def effects(base_path: str | os.PathLike[str], edited_paths: Sequence[str | os.PathLike[str]],
            out: str | os.PathLike[str], cfg: EffectsConfig | None = None,
            score_cfg: ScoreConfig | None = None) -> dict[str, Any]:
    """Compare, then write effects.json, effects.md and effects.png to ``out`` at once; return the JSON."""
    out = Path(out)
    _refuse_foreign_out(out)
    doc = compute_effects(base_path, edited_paths, cfg, score_cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        (tmp / EFFECTS_JSON).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        (tmp / EFFECTS_MD).write_text(effects_markdown(doc), encoding="utf-8")
        effects_plot(doc).savefig(tmp / EFFECTS_PNG, dpi=110)
    logger.info("wrote %s (%d edited stores vs %s)", out, len(doc["runs"]), doc["base"])
    return doc


__all__ = ["EffectsConfig", "audit_markdown", "compute_effects", "effects", "effects_markdown",
           "effects_plot",
           "paired_bootstrap"]
