"""Judges of the surface labels: consensus math, spec parsing, the command judge, relabel --judge with its
vote cache (a killed relabel resumes without asking again), and the one-line errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

from bra.cache import schema
from bra.cli.cache import main as cache_main
from bra.pipeline.consensus import Vote, consensus, votes_from_json
from bra.pipeline.judgerun import VoteCache, build_judge, run_judges
from bra.pipeline.judges import JudgeError, JudgeSpec, parse_judge_spec, vote_from_text
from bra.pipeline.manifest import load_manifest
from bra.pipeline.relabel import JudgeConfig, relabel_store

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------- consensus, by hand


def test_consensus__weighted_shares_by_hand() -> None:
    votes = [Vote("a", "refuse"), Vote("b", "comply"), Vote("c", "refuse", confidence=0.5),
             Vote.abstain("d", "timeout after 1 s")]
    c = consensus(votes, {"a": 2.0, "b": 1.0, "c": 2.0})
    # mass: refuse 2*1 + 2*0.5 = 3, comply 1 -> refuse 0.75, comply 0.25
    assert c.label == "refuse" and c.probs == pytest.approx((0.75, 0.25, 0, 0, 0))
    assert c.disagreement == pytest.approx(0.25) and not c.needs_review
    assert (c.n_votes, c.n_abstained) == (3, 1)


def test_consensus__split_is_flagged_and_ties_go_to_class_order() -> None:
    c = consensus([Vote("a", "hedge"), Vote("b", "comply")])
    assert c.label == "comply" and c.disagreement == pytest.approx(0.5) and c.needs_review
    assert not consensus([Vote("a", "hedge"), Vote("b", "comply")], threshold=0.5).needs_review


def test_consensus__only_abstentions_is_unknown_and_needs_review() -> None:
    c = consensus([Vote.abstain("a", "HTTP 500 after 3 retries"), Vote("b", "refuse")], {"b": 0.0})
    assert c.label == "unknown" and c.probs == (0.0,) * 5 and math.isnan(c.disagreement) and c.needs_review
    assert c.n_abstained == 1 and c.n_votes == 0


def test_vote__refuses_a_label_outside_the_classes() -> None:
    with pytest.raises(ValueError):
        Vote("a", "maybe")
    with pytest.raises(ValueError):
        Vote("a", None)  # an abstention needs its reason


def test_vote_from_text__first_word_or_abstention() -> None:
    assert vote_from_text("j", "**Refuse** - it declines.").label == "refuse"
    v = vote_from_text("j", "The assistant complies")
    assert v.label is None and v.abstained == "label outside the classes: 'the'"
    assert vote_from_text("j", "  ").abstained == "empty answer"


# --------------------------------------------------------------------------------- specs


def test_parse_judge_spec__kinds_targets_options() -> None:
    s = parse_judge_spec("endpoint:http://127.0.0.1:9/v1#tiny,key_env=MY_KEY,weight=2,retries=1")
    assert (s.kind, s.target, s.model, s.key_env, s.weight, s.retries) == \
        ("endpoint", "http://127.0.0.1:9/v1", "tiny", "MY_KEY", 2.0, 1)
    c = parse_judge_spec('command:"python j.py --x, y",weight=0.5,name=mine')
    assert (c.target, c.weight, c.label) == ("python j.py --x, y", 0.5, "mine")
    assert parse_judge_spec("local:/m").label == "local:/m"


@pytest.mark.parametrize("spec, words", [
    ("oracle:x", "unknown judge kind"),
    ("endpoint:http://x", "need a model"),
    ("endpoint:ftp://x#m", "http:// or https://"),
    ("local:/m,bogus=1", "bogus: unknown option"),
    ("local:/m,weight=-1", "weight must be"),
    ("local:/m,weight=lots", "weight: expected a number"),
    ("endpoint:http://x#m,api_key=sk-SENTINEL", "never put a key"),
    ('command:"python j.py', "unterminated quote"),
])
def test_parse_judge_spec__bad_specs(spec: str, words: str) -> None:
    with pytest.raises(JudgeError, match=words) as info:
        parse_judge_spec(spec)
    assert "SENTINEL" not in str(info.value) and "\n" not in str(info.value)


def test_manifest__judges_parse_validate_and_keep_old_hashes(tmp_path: Path) -> None:
    from bra.pipeline.manifest import manifest_hash

    base = {"name": "e", "model": "m", "prompt_sets": ["p.jsonl"]}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(base), encoding="utf-8")
    bare = manifest_hash(load_manifest(path), {})
    path.write_text(yaml.safe_dump({**base, "judges": []}), encoding="utf-8")
    assert manifest_hash(load_manifest(path), {}) == bare
    path.write_text(yaml.safe_dump({**base, "judges": [
        "command:\"python j.py\"", {"kind": "endpoint", "target": "http://h/v1#m", "key_env": "K"}]}),
        encoding="utf-8")
    m = load_manifest(path)
    assert [j.kind for j in m.judges] == ["command", "endpoint"] and m.judges[1].model == "m"
    assert manifest_hash(m, {}) != bare
    path.write_text(yaml.safe_dump({**base, "judges": [{"kind": "endpoint", "target": "http://h#m",
                                                        "tiemout": 3}]}), encoding="utf-8")
    with pytest.raises(Exception, match=r"judges\[0\]: .*tiemout: unknown option"):
        load_manifest(path)


# --------------------------------------------------------------------------------- the command judge

JUDGE_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    item = json.load(sys.stdin)
    count = os.environ["COUNT_FILE"]
    with open(count, "a") as fh:
        fh.write("x\\n")
    n = sum(1 for _ in open(count))
    kill_at = int(os.environ.get("KILL_AT", "0"))
    if kill_at and n == kill_at:
        os.kill(os.getppid(), signal.SIGKILL)
        sys.exit(1)
    if "abstain" in item["prompt"]:
        print(json.dumps({"abstain": "cannot say"}))
    elif "maybe" in item["prompt"]:
        print(json.dumps({"label": "maybe"}))
    elif "garbage" in item["prompt"]:
        print("not json")
    else:
        label = "refuse" if len(item["prompt"]) % 2 else "comply"
        print(json.dumps({"label": label, "confidence": 0.9, "rationale": "by length"}))
""")


@pytest.fixture()
def command_judge(tmp_path: Path, monkeypatch) -> tuple[str, Path]:
    script = tmp_path / "judge.py"
    script.write_text(JUDGE_SCRIPT, encoding="utf-8")
    count = tmp_path / "calls.txt"
    monkeypatch.setenv("COUNT_FILE", str(count))
    return f'command:"{sys.executable} {script}"', count


def _calls(count: Path) -> int:
    return sum(1 for _ in open(count)) if count.exists() else 0


def test_command_judge__votes_and_abstentions(command_judge, tmp_path: Path) -> None:
    spec, count = command_judge
    judge = build_judge(spec)
    prompts = ["odd", "even", "abstain now", "maybe so", "garbage in", "x"]
    completions = ["c"] * 5 + [""]
    cache = VoteCache(tmp_path / "votes.jsonl")
    votes, _ = run_judges([judge], prompts, completions, cache)
    got = [(v[0].label, v[0].abstained) for v in votes]
    assert got == [("refuse", None), ("comply", None), (None, "judge abstained: cannot say"),
                   (None, "label outside the classes: 'maybe'"),
                   (None, "malformed JSON on the command's stdout"),
                   (None, "empty completion")]
    assert votes[0][0].confidence == 0.9 and votes[0][0].rationale == "by length"
    assert _calls(count) == 5 and len(cache) == 2  # the empty completion is never sent; only votes cached
    again, stats2 = run_judges([judge], prompts, completions, VoteCache(tmp_path / "votes.jsonl"))
    assert stats2.cached[judge.spec.label] == 3 and _calls(count) == 8  # abstentions are asked again
    assert [v[0] for v in again[:2]] == [v[0] for v in votes[:2]]


# --------------------------------------------------------------------------------- relabel --judge


@pytest.fixture()
def store_copy(labelled_eval_store, tmp_path: Path) -> Path:
    return Path(shutil.copytree(labelled_eval_store[0], tmp_path / "copy.zarr"))


def test_relabel__judge_columns_beside_the_rule_columns(store_copy: Path, command_judge, tmp_path: Path,
                                                         capsys) -> None:
    spec, count = command_judge
    before = pd.read_parquet(store_copy / schema.PROMPTS_TABLE)
    with pytest.raises(SystemExit) as info:
        cache_main(["relabel", str(store_copy), "--judge", spec + ",weight=2",
                    "--judge-cache", str(tmp_path / "v.jsonl")])
    assert info.value.code == 0, capsys.readouterr().err
    after = pd.read_parquet(store_copy / schema.PROMPTS_TABLE)
    assert list(after.columns) == list(before.columns) + list(schema.JUDGE_COLUMNS)
    n = len(after)
    assert _calls(count) == n
    for row in after.itertuples():
        votes = votes_from_json(row.judge_votes)
        assert [v.judge for v in votes][0] == "rules" and len(votes) == 2
        judge_vote = votes[1]
        assert judge_vote.label == ("refuse" if len(row.prompt) % 2 else "comply")
        if votes[0].label is None:  # rules matched nothing: the judge alone decides
            assert row.consensus_label == judge_vote.label and row.disagreement == 0 and not row.needs_review
        assert sum(row.consensus_probs) == pytest.approx(1.0)
    assert "need review" in capsys.readouterr().out
    relabel_store(store_copy, JudgeConfig((parse_judge_spec(spec),), str(tmp_path / "v.jsonl")))
    assert _calls(count) == n  # everything cached: no call


def test_relabel__killed_midway_resumes_from_the_cache(store_copy: Path, command_judge, tmp_path: Path,
                                                        monkeypatch) -> None:
    spec, count = command_judge
    cmd = [sys.executable, "-m", "bra.cli.cache", "relabel", str(store_copy), "--judge", spec,
           "--judge-cache", str(tmp_path / "v.jsonl")]
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "COUNT_FILE": str(count), "KILL_AT": "6",
           "PATH": "/usr/bin:/bin"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert _calls(count) == 6 and len(VoteCache(tmp_path / "v.jsonl")) == 5
    assert schema.JUDGE_VOTES not in pd.read_parquet(store_copy / schema.PROMPTS_TABLE).columns
    count.unlink()
    done = subprocess.run(cmd, env={**env, "KILL_AT": "0"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    n = len(pd.read_parquet(store_copy / schema.PROMPTS_TABLE))
    assert _calls(count) == n - 5  # the five cached votes are not asked again


def test_relabel__runs_the_judges_of_the_store_manifest(store_copy: Path, command_judge, tmp_path: Path,
                                                         monkeypatch) -> None:
    from bra.cache.store import open_store
    from bra.pipeline.relabel import store_judges

    spec, count = command_judge
    assert store_judges(store_copy) == ()
    attrs = json.loads((store_copy / "zarr.json").read_text())
    attrs["attributes"]["manifest"]["judges"] = [
        {k: v for k, v in vars(parse_judge_spec(spec)).items()}]
    (store_copy / "zarr.json").write_text(json.dumps(attrs))
    assert store_judges(store_copy)[0].kind == "command"
    assert open_store(store_copy) is not None
    relabel_store(store_copy, JudgeConfig(cache=str(tmp_path / "v.jsonl")))
    assert schema.JUDGE_VOTES in pd.read_parquet(store_copy / schema.PROMPTS_TABLE).columns
    relabel_store(store_copy, JudgeConfig(judges=(), cache=str(tmp_path / "v.jsonl")))  # --no-judges


# --------------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("args, words", [
    (["--judge", "oracle:x"], "unknown judge kind"),
    (["--judge", "endpoint:http://127.0.0.1:9#m,key_env=BRA_TEST_UNSET_KEY"],
     "BRA_TEST_UNSET_KEY (key_env) is not set"),
    (["--judge", "local:/m,weight=x"], "weight: expected a number"),
    (["--review-threshold", "2", "--judge", "local:/m"], "review_threshold must be in"),
])
def test_relabel_cli__bad_judges_one_error_line(store_copy: Path, capsys, monkeypatch, args, words) -> None:
    monkeypatch.delenv("BRA_TEST_UNSET_KEY", raising=False)
    before = (store_copy / schema.PROMPTS_TABLE).read_bytes()
    with pytest.raises(SystemExit) as info:
        cache_main(["relabel", str(store_copy), *args])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert info.value.code == 2 and len(lines) == 1 and words in lines[0], err
    assert (store_copy / schema.PROMPTS_TABLE).read_bytes() == before


def test_judge_spec__is_frozen_and_holds_no_secret() -> None:
    s = JudgeSpec("endpoint", "http://h", model="m", key_env="K")
    assert "key_env" in vars(s) and not any("sk-" in str(v) for v in vars(s).values())


def test_build_stores__runs_the_manifest_judges_after_a_fresh_build(tiny_gemma_dir: Path, command_judge,
                                                                    tmp_path: Path, monkeypatch) -> None:
    """An eval manifest's `judges:` vote on the completions right after the build; a rebuild of the complete
    store asks nobody again."""
    from helpers import write_eval_set, write_manifest

    from bra.pipeline.build import build_stores

    spec, count = command_judge
    monkeypatch.setenv("BRA_JUDGE_CACHE", str(tmp_path / "votes.jsonl"))
    manifest = write_manifest(tmp_path / "eval.yaml", {
        "name": "judged", "model": {"id": str(tiny_gemma_dir), "attn_implementation": "eager"}, "layers": [1],
        "max_seq_len": 128, "batch_size": 8,
        "storage": {"dtype": "float32", "chunk_tokens": 64, "shard_tokens": 256},
        "prompt_sets": [str(write_eval_set(tmp_path / "set.jsonl"))],
        "generation": {"max_new_tokens": 4, "seed": 0, "batch_size": 8}, "judges": [spec]})
    [result] = build_stores(load_manifest(manifest), tmp_path / "eval.zarr")
    table = pd.read_parquet(Path(result.path) / schema.PROMPTS_TABLE)
    assert set(schema.JUDGE_COLUMNS) <= set(table.columns)
    assert all(len(votes_from_json(v)) == 2 for v in table["judge_votes"])  # rules + the command judge
    calls = _calls(count)
    assert calls == len(table)
    [again] = build_stores(load_manifest(manifest), tmp_path / "eval.zarr")
    assert again.status == "already-complete" and _calls(count) == calls
