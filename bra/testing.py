"""Builders for tests and the bench: a tiny random Gemma2 with a locally trained tokenizer (no download).

Above every other layer: nothing in bra imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["SAMPLE_TEXT", "ChatServer", "make_tiny_gemma"]

SAMPLE_TEXT = [
    "Cells divide by mitosis, copying their chromosomes before splitting in two.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "The smallpox eradication campaign ended in 1980 after decades of vaccination.",
    "Biosafety level four laboratories are used for the most dangerous pathogens.",
    "Ribosomes read messenger RNA and assemble proteins from amino acids.",
    "The Biological Weapons Convention entered into force in 1975.",
    "Forests store carbon in wood, roots and soil over long periods of time.",
    "Epidemiologists estimate the basic reproduction number of an outbreak.",
]


def make_tiny_gemma(path: Path, vocab_size: int = 512, layers: int = 4) -> Path:
    """Save a random Gemma2ForCausalLM (hidden 64) and a BPE tokenizer trained on SAMPLE_TEXT to ``path``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SAMPLE_TEXT * 4, trainer)
    from tokenizers import decoders, processors

    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                       sliding_window=32, attn_implementation="eager", pad_token_id=0, eos_token_id=1,
                       bos_token_id=2)
    model = Gemma2ForCausalLM(cfg)
    model.save_pretrained(path)
    return path


class ChatServer:
    """A loopback OpenAI-compatible ``/v1/chat/completions`` server that runs a real model (greedy, with
    transformers), for testing endpoint judges; use as a context manager (it serves from a thread).

    ``fail``: how the first requests are answered, one mode each, before every later one is answered by
    ``default``: ``ok``, ``500``, ``429`` (with Retry-After: 0), ``timeout`` (sleeps ``hang`` s before
    answering), ``malformed`` (200 with a body that is not JSON). ``api_key``: when set, a request without
    ``Authorization: Bearer API_KEY`` gets 401. ``choices``: answer with the choice the model finds likeliest
    after the prompt (constrained decoding, as vLLM's ``guided_choice``; a random model then still answers
    with a class word). ``requests`` counts the requests served.
    """

    def __init__(self, model_dir: Path, fail: tuple[str, ...] = (), default: str = "ok",
                 api_key: str | None = None, max_new_tokens: int = 8, hang: float = 2.0,
                 choices: tuple[str, ...] | None = None) -> None:
        import threading

        self.model_dir, self.modes, self.default = model_dir, list(fail), default
        self.api_key, self.max_new_tokens, self.hang = api_key, max_new_tokens, hang
        self.requests = 0
        self.choices = choices
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None

    @property
    def url(self) -> str:
        """Base URL (``http://127.0.0.1:PORT/v1``)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def _mode(self) -> str:
        with self._lock:
            self.requests += 1
            return self.modes.pop(0) if self.modes else self.default

    def _generate(self, messages: list[dict[str, str]]) -> str:
        import torch

        tok, model = self._tokenizer, self._model
        try:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=False)
        except Exception:  # no system role in the template: fold it into the user turn
            text = "\n\n".join(m["content"] for m in messages)
            ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=False)
        if self.choices:
            return self._choose(ids)
        with self._lock, torch.no_grad():
            out = model.generate(ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def _choose(self, ids: Any) -> str:
        """The choice with the highest summed token log-probability after ``ids`` [1, T]."""
        import torch

        best, best_score = "", float("-inf")
        for choice in self.choices or ():
            cont = self._tokenizer(choice, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with self._lock, torch.no_grad():
                logits = self._model(torch.cat([ids, cont], 1)).logits[0].float()
            logp = torch.log_softmax(logits[ids.shape[1] - 1:-1], -1).gather(1, cont[0][:, None]).sum()
            if float(logp) > best_score:
                best, best_score = choice, float(logp)
        return best

    def __enter__(self) -> ChatServer:
        import json
        import threading
        import time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=False)
        self._model = AutoModelForCausalLM.from_pretrained(self.model_dir, trust_remote_code=False).eval()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                mode = server._mode()
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, b'{"error": "not found"}')
                key = server.api_key
                if key is not None and self.headers.get("Authorization") != f"Bearer {key}":
                    return self._send(401, b'{"error": "bad key"}')
                if mode in ("500", "429"):
                    return self._send(int(mode), b'{"error": "failing on purpose"}', {"Retry-After": "0"})
                if mode == "malformed":
                    return self._send(200, b"{not json")
                if mode == "timeout":
                    time.sleep(server.hang)
                request = json.loads(body)
                text = server._generate(request["messages"])
                reply = {"id": "chatcmpl-test", "object": "chat.completion", "model": request.get("model"),
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}]}
                try:
                    self._send(200, json.dumps(reply).encode())
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
