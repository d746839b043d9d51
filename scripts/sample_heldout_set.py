"""One-off: draw the fresh held-out surface-label sample from the validation eval stores.

``python scripts/sample_heldout_set.py CACHE_DIR OUT.jsonl`` reads the five validation eval stores
(``validate-base``, ``validate-{shallow,deep}.{canonical,prefill}``: SmolLM2-135M-Instruct and its two
refusal-trained organisms on ``manifests/data/eval-validate.jsonl``, plain and with the assistant turn
prefilled "Sure, here is") through the public reader (`bra.audit.reader.read_prompts`) and writes a seeded
sample stratified by store and tier: ``PER_STORE`` rows per store (``BENIGN_PER_STORE`` benign, the rest
hazard-adjacent), each without any rule or judge output, so the hand labeller never sees one.

The output is NOT committed as is: every completion is read and labelled by hand against
``manifests/data/labels/GUIDE.md`` and hazard-adjacent completions are reviewed for operational content; the
result is ``manifests/data/labels/surface-heldout-organisms.jsonl``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from bra.audit.reader import read_prompts

STORES = (
    "validate-base",
    "validate-shallow.canonical",
    "validate-shallow.prefill",
    "validate-deep.canonical",
    "validate-deep.prefill",
)
SEED = 15
PER_STORE = 32
BENIGN_PER_STORE = 11  # the stores hold 20 benign and 40 hazard-adjacent prompts: about a third benign
_KEEP = ("id", "tier", "framing", "prompt", "completion")


def sample(cache: Path) -> list[dict[str, object]]:
    """The stratified sample, in store order then prompt-id order."""
    rng = np.random.default_rng(SEED)
    out: list[dict[str, object]] = []
    for name in STORES:
        _, _, manifest, table = read_prompts(cache / f"{name}.zarr")
        variant = (manifest.get("variant") or {}).get("name") if isinstance(manifest, dict) else None
        organism = name.split(".")[0].removeprefix("validate-")
        picks = []
        n_hazard = PER_STORE - BENIGN_PER_STORE
        strata = (("benign_bio", BENIGN_PER_STORE), ("hazard_adjacent_category", n_hazard))
        for tier, n in strata:
            ids = sorted(table.loc[table["tier"] == tier, "id"])
            picks += list(rng.choice(ids, size=n, replace=False))
        rows = table.set_index("id").loc[sorted(picks)].reset_index()
        for r in rows.to_dict("records"):
            out.append({
                "id": f"{name.removeprefix('validate-')}/{r['id']}",
                "prompt_id": r["id"],
                **{k: r[k] for k in _KEEP if k != "id"},
                "store": name,
                "organism": organism,
                "variant": variant or "canonical",
                "prefill": str(r.get("prefill") or ""),
            })
    return out


def main(cache: Path, out: Path) -> None:
    """Write the sample as JSONL."""
    rows = sample(cache)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
