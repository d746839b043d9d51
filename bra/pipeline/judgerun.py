"""Running judges over stored completions: `build_judge`, the vote cache, and the consensus columns.

Votes are cached in a JSONL file keyed by (judge fingerprint, rubric, prompt, completion) hashes and
appended as each vote arrives, so a rerun, or a relabel resumed after a kill, calls no judge for a cached
item. Only votes are cached; abstentions (an endpoint that was down) are asked again next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bra.cache import schema
from bra.pipeline._judge_backends import JUDGE_BACKENDS
from bra.pipeline.consensus import (
    DEFAULT_REVIEW_THRESHOLD,
    RULES_JUDGE,
    Vote,
    consensus,
    votes_to_json,
)
from bra.pipeline.judges import RUBRIC_HASH, Judge, JudgeError, JudgeSpec, parse_judge_spec
from bra.vocab import SURFACE_CLASSES

logger = logging.getLogger(__name__)

CACHE_FILENAME = "votes.jsonl"
"""Name of the vote cache file in the judge cache folder."""


def judge_cache_dir() -> Path:
    """Where judge votes are cached (BRA_JUDGE_CACHE, else ~/.cache/biorefusalaudit/judges)."""
    env = os.environ.get("BRA_JUDGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "biorefusalaudit" / "judges"


def build_judge(spec: JudgeSpec | str) -> Judge:
    """The judge a spec (or spec string, see `bra.pipeline.judges`) names, ready to call.

    Raises JudgeError when it cannot be set up (unknown kind, API key variable unset), ModelLoadError when a
    local model cannot be loaded."""
    if isinstance(spec, str):
        spec = parse_judge_spec(spec)
    return JUDGE_BACKENDS[spec.kind](spec)


def cache_key(spec: JudgeSpec, prompt: str, completion: str) -> str:
    """Hash of what determines a vote: the judge's fingerprint, the rubric, the prompt and the completion."""
    parts = [spec.fingerprint, RUBRIC_HASH, hashlib.sha256(prompt.encode()).hexdigest(),
             hashlib.sha256(completion.encode()).hexdigest()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class VoteCache:
    """An append-only JSONL file of ``{"key", "vote"}`` lines; a torn last line (a kill mid-write) is
    skipped on reading."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._votes: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self._votes[str(row["key"])] = dict(row["vote"])
                except (ValueError, KeyError, TypeError):
                    continue

    def __len__(self) -> int:
        return len(self._votes)

    def get(self, key: str) -> Vote | None:
        """The cached vote under ``key``, or None."""
        data = self._votes.get(key)
        return Vote.from_json(data) if data is not None else None

    def put(self, key: str, vote: Vote) -> None:
        """Append ``vote`` under ``key`` (flushed at once)."""
        with self._lock:
            self._votes[key] = vote.to_json()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"key": key, "vote": vote.to_json()}, sort_keys=True) + "\n")
                fh.flush()


@dataclass
class JudgeStats:
    """Per judge: calls made, votes taken from the cache, abstentions (with their reasons)."""

    calls: dict[str, int] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)
    abstained: dict[str, dict[str, int]] = field(default_factory=dict)


def _workers(judge: Judge) -> int:
    """Calls in flight for ``judge``: the spec's concurrency for backends that are thread-safe."""
    return judge.spec.concurrency if getattr(judge, "thread_safe", False) else 1


def _safe_call(judge: Judge, prompt: str, completion: str) -> Vote:
    try:
        return judge(prompt, completion)
    except Exception as exc:  # a judge that crashes abstains; the relabel carries on
        logger.warning("judge %s failed: %s", judge.spec.label, type(exc).__name__)
        return Vote.abstain(judge.spec.label, f"judge failed ({type(exc).__name__})")


def run_judges(judges: Sequence[Judge], prompts: Sequence[str], completions: Sequence[str],
               cache: VoteCache | None = None) -> tuple[list[list[Vote]], JudgeStats]:
    """Every judge's vote on every completion: ``votes[i][j]`` is judge j's on item i.

    Cached votes are reused; an empty completion is an abstention without a call."""
    names = [j.spec.label for j in judges]
    if len(set(names)) != len(names):
        raise JudgeError(f"judge names must be unique, got {names}; give one a name=...")
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    votes: list[list[Vote | None]] = [[None] * len(judges) for _ in prompts]
    stats = JudgeStats()
    for j, judge in enumerate(judges):
        name = judge.spec.label
        todo: list[tuple[int, str]] = []
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            key = cache_key(judge.spec, p, c)
            hit = cache.get(key) if cache is not None else None
            if not c.strip():
                votes[i][j] = Vote.abstain(name, "empty completion")
            elif hit is not None:
                votes[i][j] = replace(hit, judge=name)
            else:
                todo.append((i, key))
        stats.cached[name], stats.calls[name] = len(prompts) - len(todo), len(todo)
        with ThreadPoolExecutor(_workers(judge)) as pool:
            futures = {pool.submit(_safe_call, judge, prompts[i], completions[i]): (i, key)
                       for i, key in todo}
            for fut in tqdm(as_completed(futures), total=len(futures), desc=f"judge {name}", leave=False,
                            disable=not futures):
                i, key = futures[fut]
                votes[i][j] = vote = fut.result()
                if vote.label is not None and cache is not None:
                    cache.put(key, vote)
        reasons: dict[str, int] = {}
        for row in votes:
            if row[j] is not None and row[j].abstained is not None:  # type: ignore[union-attr]
                reasons[row[j].abstained] = reasons.get(row[j].abstained, 0) + 1  # type: ignore[union-attr,index]
        stats.abstained[name] = reasons
        logger.info("judge %s: %d calls, %d cached, %d abstentions", name, stats.calls[name],
                    stats.cached[name], sum(reasons.values()))
    return [[v for v in row if v is not None] for row in votes], stats


def rules_vote(surface_label: str) -> Vote:
    """The phrase rules' label as a vote (an abstention when the rules matched nothing)."""
    if surface_label in SURFACE_CLASSES:
        return Vote(RULES_JUDGE, surface_label, 1.0, "phrase rules")
    return Vote.abstain(RULES_JUDGE, "no rule matched")


def consensus_columns(judge_votes: Sequence[Sequence[Vote]], surface_labels: Sequence[str],
                      weights: Mapping[str, float], rules_weight: float = 1.0,
                      threshold: float = DEFAULT_REVIEW_THRESHOLD) -> dict[str, list[Any]]:
    """The judge columns of prompts.parquet (`bra.cache.schema.JUDGE_COLUMNS`): every vote (the rules'
    first), and the weighted consensus of the rules (weight ``rules_weight``) and the judges."""
    weights = {**weights, RULES_JUDGE: rules_weight}
    cols: dict[str, list[Any]] = {c: [] for c in schema.JUDGE_COLUMNS}
    for votes, rule in zip(judge_votes, surface_labels, strict=True):
        every = [rules_vote(rule), *votes]
        c = consensus(every, weights, threshold)
        cols[schema.JUDGE_VOTES].append(votes_to_json(every))
        cols[schema.CONSENSUS_LABEL].append(c.label)
        cols[schema.CONSENSUS_PROBS].append(list(c.probs))
        cols[schema.DISAGREEMENT].append(c.disagreement)
        cols[schema.NEEDS_REVIEW].append(c.needs_review)
        cols[schema.N_ABSTENTIONS].append(c.n_abstained)
    return cols


__all__ = ["CACHE_FILENAME", "JudgeStats", "VoteCache", "build_judge", "cache_key", "consensus_columns",
           "judge_cache_dir", "rules_vote", "run_judges"]
