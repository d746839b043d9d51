"""Stage one for eval prompts: generate greedy completions, then plan one window per prompt.

Each window is the chat-templated prompt followed by the model's own completion; its ``segment`` column
marks which rows are prompt (``SEGMENT_PROMPT``) and which are completion (``SEGMENT_COMPLETION``). The
build then runs the usual teacher-forced forward over these windows, so a completion row's activation
is the residual stream at that token given everything before it. The text, token counts and surface
labels go to ``prompts.parquet`` (one row per prompt, linked by ``doc_index``); the exact token ids to
``generation.parquet``, which a resumed build reads back instead of generating again.

Under torchrun each rank generates a contiguous run of the generation batches a single process would form
(so the completions are the same) and every rank receives all of them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from bra.cache import schema
from bra.dist import SINGLE, Dist
from bra.errors import ManifestError
from bra.pipeline.generate import GenerationResult, chat_prompt_ids, generate_completions, stop_token_ids
from bra.pipeline.manifest import Manifest
from bra.pipeline.plan import TokenPlan, Window
from bra.pipeline.prompts import EvalPrompt, load_eval_set_files, metadata_columns
from bra.pipeline.relabel import surface_columns
from bra.vocab import EVAL_TIERS, TIERS

logger = logging.getLogger(__name__)

GENERATION_COUNTS_KEY = "generation"


def _load_sets(manifest: Manifest) -> list[tuple[str, str, list[EvalPrompt]]]:
    """(set name, source path as written in the manifest, prompts) per prompt set, in manifest order."""
    paths = [manifest.resolve(spec.path) for spec in manifest.prompt_sets]
    # validates every file and rejects ids repeated across sets, with file:line
    loaded = load_eval_set_files(paths)
    out: list[tuple[str, str, list[EvalPrompt]]] = []
    names: set[str] = {GENERATION_COUNTS_KEY}
    for spec, prompts in zip(manifest.prompt_sets, loaded, strict=True):
        name, n = Path(spec.path).stem, 1
        while name in names:  # two sets with the same file name in different folders
            n += 1
            name = f"{Path(spec.path).stem}-{n}"
        names.add(name)
        out.append((name, spec.path, prompts))
    return out


def eval_tier_names(manifest: Manifest, prompts: list[EvalPrompt]) -> tuple[str, ...]:
    """The store's tier names (index = tier code): ``TIERS``, then the control tiers the prompts use, in
    ``EVAL_TIERS`` order (so stores of the bundled sets keep their codes). Raises ``ManifestError`` when
    ``hazard_tiers`` or ``benign_tiers`` names a tier no prompt has."""
    present = {p.tier for p in prompts}
    for key in ("hazard_tiers", "benign_tiers"):
        missing = [t for t in getattr(manifest, key) if t not in present]
        if missing:
            raise ManifestError(f"{key}: no prompt has tier {missing[0]!r} (the prompt sets have "
                                f"{', '.join(t for t in EVAL_TIERS if t in present)})")
    return TIERS + tuple(t for t in EVAL_TIERS if t not in TIERS and t in present)


def _check_room(manifest: Manifest, prompts: list[EvalPrompt], tokenizer: Any) -> None:
    """Fail before generating if the longest prompt plus max_new_tokens could overflow max_seq_len."""
    lengths = [len(chat_prompt_ids(tokenizer, p.prompt)) for p in prompts]
    longest = int(np.argmax(lengths))
    need = lengths[longest] + manifest.generation.max_new_tokens
    if need > manifest.max_seq_len:
        raise ManifestError(
            f"max_seq_len: {manifest.max_seq_len} is too short for eval windows: prompt "
            f"{prompts[longest].id!r} has {lengths[longest]} chat-template tokens and "
            f"generation.max_new_tokens is {manifest.generation.max_new_tokens}; raise max_seq_len to at "
            f"least {need} (prompt + completion windows are never truncated)"
        )


def _window(doc_index: int, result: GenerationResult) -> Window:
    ids = np.asarray(result.prompt_ids + result.completion_ids, dtype=np.int32)
    segment = np.concatenate([np.full(len(result.prompt_ids), schema.SEGMENT_PROMPT, np.int8),
                              np.full(len(result.completion_ids), schema.SEGMENT_COMPLETION, np.int8)])
    return Window(doc_index, ids, segment)


def generation_table(results: list[GenerationResult]) -> pd.DataFrame:
    """The generation results as a table (``GENERATION_TABLE``), one row per prompt in plan order."""
    return pd.DataFrame({
        "doc_index": np.arange(len(results), dtype=np.int32),
        "prompt_ids": [np.asarray(r.prompt_ids, dtype=np.int32) for r in results],
        "completion_ids": [np.asarray(r.completion_ids, dtype=np.int32) for r in results],
        "text": [r.text for r in results],
        "finished": np.asarray([r.finished for r in results], dtype=bool),
    })[list(schema.GENERATION_COLUMNS)]


def results_from_table(table: pd.DataFrame) -> list[GenerationResult]:
    """Inverse of ``generation_table``."""
    rows = table.sort_values("doc_index")
    return [GenerationResult([int(i) for i in p], [int(i) for i in c], str(t), bool(f))
            for p, c, t, f in zip(rows["prompt_ids"], rows["completion_ids"], rows["text"], rows["finished"],
                                  strict=True)]


def _saved_results(saved: pd.DataFrame | None, prompts: list[EvalPrompt],
                   tokenizer: Any) -> list[GenerationResult] | None:
    """The saved results when they belong to exactly these prompts as this tokenizer templates them."""
    if saved is None:
        return None
    try:
        results = results_from_table(saved)
    except (KeyError, TypeError, ValueError):
        logger.warning("the saved completions are unreadable; generating them again")
        return None
    if len(results) != len(prompts) or any(
            r.prompt_ids != chat_prompt_ids(tokenizer, p.prompt)
            for r, p in zip(results, prompts, strict=True)):
        logger.warning("the saved completions belong to other prompts; generating them again")
        return None
    logger.info("reusing the %d completions saved by the interrupted build", len(results))
    return results


def _generate_shared(model: nn.Module, tokenizer: Any, prompts: list[str], spec: Any, device: torch.device,
                     dist: Dist) -> list[GenerationResult]:
    """Every prompt's completion, each rank generating a contiguous run of whole batches (see module doc)."""
    n_batches = -(-len(prompts) // spec.batch_size)
    mine = np.array_split(np.arange(n_batches), dist.world)[dist.rank]
    lo = int(mine[0]) * spec.batch_size if len(mine) else 0
    hi = min(len(prompts), (int(mine[-1]) + 1) * spec.batch_size) if len(mine) else 0
    local: list[GenerationResult] = []
    error = None
    try:
        if hi > lo:
            local = generate_completions(model, tokenizer, prompts[lo:hi], spec, device)
    except Exception as exc:  # every rank must learn of it, or the others wait at the gather
        error = exc
    dist.check(error)
    return [r for part in dist.gather(local) for r in part]


def plan_prompts(manifest: Manifest, model: nn.Module, tokenizer: Any, device: torch.device,
                 dist: Dist = SINGLE, saved: pd.DataFrame | None = None,
                 ) -> tuple[TokenPlan, dict[str, pd.DataFrame]]:
    """Generate completions for the manifest's prompt sets (or reuse ``saved``, an interrupted build's
    ``GENERATION_TABLE``); return the plan and ``{PROMPTS_TABLE: ..., GENERATION_TABLE: ...}``."""
    sets = _load_sets(manifest)
    prompts = [p for _, _, ps in sets for p in ps]
    tier_names = eval_tier_names(manifest, prompts)
    _check_room(manifest, prompts, tokenizer)
    results = _saved_results(saved, prompts, tokenizer)
    if results is None:
        t0 = time.perf_counter()
        results = _generate_shared(model, tokenizer, [p.prompt for p in prompts], manifest.generation, device,
                                   dist)
        seconds = time.perf_counter() - t0
        n_new = sum(len(r.completion_ids) for r in results)
        logger.info("generation: %d new tokens in %.1fs (%.0f tok/s)", n_new, seconds,
                    n_new / max(seconds, 1e-9))

    plan = TokenPlan(tier_names=tier_names)
    rows: list[dict[str, Any]] = []
    offset = 0
    it = iter(zip(prompts, results, strict=True))
    for name, source, set_prompts in sets:
        counts = {"docs": 0, "tokens": 0, "windows": 0, "completion_tokens": 0, "finished": 0}
        for _ in set_prompts:
            prompt, result = next(it)
            window = _window(len(plan.docs), result)
            n = len(window.ids)
            if n > manifest.max_seq_len:  # _check_room makes this unreachable unless the template changed
                raise ManifestError(f"max_seq_len: prompt {prompt.id!r} with its completion is {n} tokens, "
                                    f"longer than max_seq_len {manifest.max_seq_len}; raise max_seq_len")
            tier_code = tier_names.index(prompt.tier)
            plan.docs.append({
                "doc_index": window.doc_index, "doc_id": prompt.id, "tier": prompt.tier,
                "tier_code": tier_code, "corpus": name, "source": source, "n_tokens": n,
                "token_offset": offset, "n_windows": 1, "n_text_tokens": n,
            })
            plan.tier_codes[window.doc_index] = tier_code
            plan.windows.append(window)
            rows.append(_prompt_row(prompt, result, window.doc_index))
            offset += n
            counts["docs"] += 1
            counts["windows"] += 1
            counts["tokens"] += n
            counts["completion_tokens"] += len(result.completion_ids)
            counts["finished"] += int(result.finished)
        plan.counts[name] = counts
    plan.counts[GENERATION_COUNTS_KEY] = _generation_record(manifest, model, tokenizer, results)
    table = pd.DataFrame(rows)
    for key, values in surface_columns(table["prompt"].tolist(), table["completion"].tolist()).items():
        table[key] = values
    # The prompt sets' own extra fields follow the schema's columns (none for files in the upstream format).
    extra = metadata_columns(prompts, taken=schema.PROMPT_COLUMNS)
    return plan, {schema.PROMPTS_TABLE: table[list(schema.PROMPT_COLUMNS)].assign(**extra),
                  schema.GENERATION_TABLE: generation_table(results)}


def _prompt_row(prompt: EvalPrompt, result: GenerationResult, doc_index: int) -> dict[str, Any]:
    return {
        "id": prompt.id, "tier": prompt.tier, "framing": prompt.framing, "category": prompt.category,
        "domain": prompt.domain, "expected_surface": prompt.expected_surface, "prompt": prompt.prompt,
        "completion": result.text, "n_prompt_tokens": len(result.prompt_ids),
        "n_completion_tokens": len(result.completion_ids), "doc_index": doc_index,
        "finished": result.finished,
        "rationale": prompt.rationale, "sampled_from": prompt.sampled_from,
    }


def _generation_record(manifest: Manifest, model: nn.Module, tokenizer: Any,
                       results: list[GenerationResult]) -> dict[str, Any]:
    """How the completions were made (stored in the store's attrs under corpus_counts)."""
    g = manifest.generation
    return {
        "decoding": "greedy", "max_new_tokens": g.max_new_tokens, "seed": g.seed, "batch_size": g.batch_size,
        "padding": "left", "chat_template": True, "stop_token_ids": stop_token_ids(model, tokenizer),
        "prompts": len(results), "finished": sum(int(r.finished) for r in results),
        "completion_tokens": sum(len(r.completion_ids) for r in results),
    }
