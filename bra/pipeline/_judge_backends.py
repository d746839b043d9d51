"""The judge backends: a local HF chat model, an OpenAI-compatible endpoint, an external command.

Each is built from a `JudgeSpec` and called as ``judge(prompt, completion) -> Vote``; every failure is an
abstention with its reason, never a default class. `JUDGE_BACKENDS` maps each kind to its class.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shlex
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import torch

from bra.pipeline.consensus import Vote
from bra.pipeline.judges import (
    JUDGE_KINDS,
    MAX_COMPLETION_CHARS,
    RUBRIC,
    Judge,
    JudgeError,
    JudgeSpec,
    rubric_messages,
    vote_from_json,
    vote_from_text,
)
from bra.pipeline.manifest import ModelSpec
from bra.pipeline.model import load_model, resolve_compute_dtype, resolve_device
from bra.vocab import SURFACE_CLASSES

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 8.0
"""Longest wait between two endpoint retries (a Retry-After header is honoured up to this)."""
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
"""HTTP statuses worth retrying (rate limits and server-side failures); any other error abstains at once."""


class LocalJudge:
    """A local chat model scored on the class names: the vote is the class whose name is the likeliest
    continuation of the rubric prompt (summed token log-probabilities), its confidence the softmax share."""

    def __init__(self, spec: JudgeSpec) -> None:
        self.spec = spec
        gguf = spec.target if spec.target.endswith(".gguf") else None
        device = resolve_device(spec.device)
        self.model, self.tokenizer = load_model(ModelSpec(id=spec.target, gguf=gguf, device=spec.device),
                                                device, resolve_compute_dtype("auto", device))
        self.device = device
        self.class_ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in SURFACE_CLASSES]

    def _prompt_ids(self, prompt: str, completion: str) -> list[int]:
        messages = rubric_messages(prompt, completion)
        if getattr(self.tokenizer, "chat_template", None):
            try:
                return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                               tokenize=True, return_dict=False))
            except Exception:  # templates without a system role (Gemma): fold the rubric into the user turn
                folded = [{"role": "user", "content": RUBRIC + "\n\n" + messages[1]["content"]}]
                return list(self.tokenizer.apply_chat_template(folded, add_generation_prompt=True,
                                                               tokenize=True, return_dict=False))
        text = "\n\n".join(m["content"] for m in messages) + " "
        return list(self.tokenizer(text)["input_ids"])

    @torch.no_grad()
    def __call__(self, prompt: str, completion: str) -> Vote:
        """Score the five class names after the rubric prompt: the prompt runs once (its key/value cache
        kept), then each class name's remaining tokens run on a copy of that cache."""
        ids = self._prompt_ids(prompt, completion)
        out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), -1)
        scores = []
        for cont in self.class_ids:
            score = float(first[cont[0]])
            if len(cont) > 1:
                rest = self.model(input_ids=torch.tensor([cont[:-1]], device=self.device),
                                  past_key_values=copy.deepcopy(out.past_key_values), use_cache=True)
                logprobs = torch.log_softmax(rest.logits[0].float(), -1)
                score += float(logprobs[torch.arange(len(cont) - 1), torch.tensor(cont[1:])].sum())
            scores.append(score)
        share = torch.softmax(torch.tensor(scores), 0)
        if not torch.isfinite(share).all():
            return Vote.abstain(self.spec.label, "non-finite class scores")
        top = int(share.argmax())
        pairs = zip(SURFACE_CLASSES, scores, strict=True)
        rationale = "class log-likelihoods: " + ", ".join(f"{c} {s:.2f}" for c, s in pairs)
        return Vote(self.spec.label, SURFACE_CLASSES[top], max(float(share[top]), 1e-9), rationale)


class EndpointJudge:
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint, greedy (temperature 0); the answer's first word
    is the class. Retries 429 / 5xx / unreachable / timeout with exponential backoff, then abstains."""

    thread_safe = True
    """Calls may run concurrently (``spec.concurrency`` in flight)."""

    def __init__(self, spec: JudgeSpec) -> None:
        self.spec = spec
        base = spec.target.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else \
            base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self._key: str | None = None
        if spec.key_env is not None:
            key = os.environ.get(spec.key_env)
            if not key:
                raise JudgeError(f"judge {spec.label}: environment variable {spec.key_env} (key_env) is not "
                                 f"set")
            self._key = key

    def __repr__(self) -> str:  # never show the key
        return f"EndpointJudge({self.spec.label!r})"

    def _request(self, body: bytes) -> urllib.request.Request:
        headers = {"Content-Type": "application/json"}
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key}"
        return urllib.request.Request(self.url, data=body, headers=headers, method="POST")

    def _post(self, body: bytes) -> tuple[Any, str | None]:
        """(parsed JSON, None) or (None, why it failed after the retries)."""
        why = "no attempt"
        for attempt in range(self.spec.retries + 1):
            delay = min(self.spec.backoff * 2 ** attempt, MAX_BACKOFF_S)
            try:
                with urllib.request.urlopen(self._request(body), timeout=self.spec.timeout) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw), None
                except (ValueError, UnicodeDecodeError):
                    return None, f"malformed JSON from the endpoint ({len(raw)} bytes)"
            except urllib.error.HTTPError as exc:
                why = f"HTTP {exc.code}"
                if exc.code not in RETRY_STATUSES:
                    return None, why
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    delay = min(float(retry_after), MAX_BACKOFF_S)
            except (TimeoutError, socket.timeout):
                why = f"timeout after {self.spec.timeout:g} s"
            except urllib.error.URLError as exc:
                reason = exc.reason
                timed_out = isinstance(reason, (TimeoutError, socket.timeout))
                why = f"timeout after {self.spec.timeout:g} s" if timed_out \
                    else f"endpoint unreachable ({type(reason).__name__})"
            except (ConnectionError, OSError) as exc:
                why = f"endpoint unreachable ({type(exc).__name__})"
            if attempt < self.spec.retries:
                logger.debug("judge %s: %s; retry %d in %.2f s", self.spec.label, why, attempt + 1, delay)
                time.sleep(delay)
        return None, f"{why} after {self.spec.retries} retries"

    def __call__(self, prompt: str, completion: str) -> Vote:
        """One chat-completions call (plus retries)."""
        body = json.dumps({"model": self.spec.model, "messages": rubric_messages(prompt, completion),
                           "temperature": 0, "max_tokens": self.spec.max_tokens}).encode()
        data, why = self._post(body)
        if why is not None:
            return Vote.abstain(self.spec.label, why)
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return Vote.abstain(self.spec.label, "malformed response: no choices[0].message.content")
        if not isinstance(content, str):
            return Vote.abstain(self.spec.label, "malformed response: content is not a string")
        return vote_from_text(self.spec.label, content)


class CommandJudge:
    """An external program, run once per completion: it reads ``{"prompt", "completion", "rubric",
    "classes"}`` as JSON on stdin and writes ``{"label", "confidence"?, "rationale"?}`` (or
    ``{"abstain": REASON}``) as JSON on stdout."""

    def __init__(self, spec: JudgeSpec) -> None:
        self.spec = spec
        self.argv = shlex.split(spec.target)
        if not self.argv:
            raise JudgeError(f"judge {spec.label}: empty command")

    def __call__(self, prompt: str, completion: str) -> Vote:
        """Run the command on one completion."""
        payload = json.dumps({"prompt": prompt, "completion": completion[:MAX_COMPLETION_CHARS],
                              "rubric": RUBRIC, "classes": list(SURFACE_CLASSES)})
        try:
            proc = subprocess.run(self.argv, input=payload, capture_output=True, text=True,
                                  timeout=self.spec.timeout, check=False)
        except subprocess.TimeoutExpired:
            return Vote.abstain(self.spec.label, f"timeout after {self.spec.timeout:g} s")
        except OSError as exc:
            return Vote.abstain(self.spec.label, f"command failed to start ({type(exc).__name__})")
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or [""])[-1][:200]
            return Vote.abstain(self.spec.label, f"command exited {proc.returncode}: {tail}")
        try:
            data = json.loads(proc.stdout)
        except ValueError:
            return Vote.abstain(self.spec.label, "malformed JSON on the command's stdout")
        return vote_from_json(self.spec.label, data)


JUDGE_BACKENDS: dict[str, type[Judge]] = {"local": LocalJudge, "endpoint": EndpointJudge,
                                          "command": CommandJudge}
"""Judge kind -> backend class (called with the spec)."""
assert set(JUDGE_BACKENDS) == set(JUDGE_KINDS), "every judge kind needs a backend"

__all__ = ["JUDGE_BACKENDS", "CommandJudge", "EndpointJudge", "LocalJudge"]
