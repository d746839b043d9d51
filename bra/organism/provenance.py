"""An organism folder's ``provenance.json``: how it was made, and the checks the audit makes with it.

An organism is an ordinary Hugging Face model folder (safetensors, config, tokenizer) that any tool, and
``bra-cache build`` with ``model.id: <folder>``, loads as it loads its base model; ``provenance.json``
beside the weights is what makes it an organism: kind, base model, layer, recipe, data hashes, seed, the
prompts it was trained on, time taken.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bra.errors import OrganismError
from bra.fsutil import write_text_atomic

PROVENANCE_FILE = "provenance.json"
PROVENANCE_FORMAT = "bra-organism/1"
_REQUIRED = ("format", "kind", "layer", "base_model", "fingerprint", "trained_prompt_ids")


def is_organism(folder: str | Path) -> bool:
    """Whether ``folder`` holds a provenance file (says nothing of its contents)."""
    return (Path(folder) / PROVENANCE_FILE).is_file()


def write_provenance(folder: Path, data: dict[str, Any]) -> None:
    """Write ``provenance.json`` (atomically) with ``format`` set."""
    write_text_atomic(folder / PROVENANCE_FILE,
                      json.dumps({"format": PROVENANCE_FORMAT, **data}, indent=2, sort_keys=False) + "\n")


def load_provenance(folder: str | Path) -> dict[str, Any]:
    """The provenance of the organism in ``folder``; ``OrganismError`` (one line) when the folder, its
    provenance or a required key is missing, or the file is not JSON."""
    path = Path(folder) / PROVENANCE_FILE
    if not Path(folder).is_dir():
        raise OrganismError(f"organism {folder}: not a folder")
    if not path.is_file():
        raise OrganismError(f"organism {folder}: no {PROVENANCE_FILE} (a model folder, but not one "
                            f"bra-organism built: its recipe and training prompts are unknown)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OrganismError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise OrganismError(f"{path}: expected a JSON object")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise OrganismError(f"{path}: missing key {missing[0]!r}")
    if data["format"] != PROVENANCE_FORMAT:
        raise OrganismError(f"{path}: format {data['format']!r}, expected {PROVENANCE_FORMAT!r}")
    return data


def check_audit_prompts(organism_folder: str | Path, prompt_ids: Iterable[str]) -> None:
    """Refuse to audit an organism on prompts it was trained on: ``OrganismError`` naming the overlapping
    ids (and ``load_provenance``'s errors for a folder without provenance)."""
    trained = set(load_provenance(organism_folder)["trained_prompt_ids"])
    overlap = sorted({str(i) for i in prompt_ids} & trained)
    if overlap:
        shown = ", ".join(overlap[:10]) + (f", ... ({len(overlap)} in all)" if len(overlap) > 10 else "")
        raise OrganismError(f"organism {organism_folder} was trained on {len(overlap)} of the audit prompts "
                            f"({shown}); audit it on prompts it was not trained on")
