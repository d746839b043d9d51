"""`bra-cache build` on bad input: exit != 0, exactly one ``error: ...`` line, no complete-looking store."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import error_lines, tiny_manifest, write_manifest

from bra.cache import schema
from bra.cache.store import open_store
from bra.cache.verify import verify_store
from bra.cli.cache import main as cli_main
from bra.errors import StoreError

pytestmark = pytest.mark.usefixtures("one_thread")


def build_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run `bra-cache build ARGV` in-process; return (exit code, the one error line)."""
    with pytest.raises(SystemExit) as info:
        cli_main(["build", *argv])
    _, err = capsys.readouterr()
    code = int(info.value.code or 0)
    errors = error_lines(err)
    assert code != 0, err
    assert len(errors) == 1, err
    return code, errors[0]


def assert_no_complete_store(path: Path) -> None:
    if path.exists():
        with pytest.raises(StoreError):
            open_store(path)


def edit(manifest: Path, fn) -> Path:
    data = yaml.safe_load(manifest.read_text(encoding="utf-8"))
    fn(data)
    return write_manifest(manifest, data)


def test_build_cli__malformed_manifest(tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "bad.yaml"
    manifest.write_text("name: x\nmodel: {id: a\nlayers: [1\n", encoding="utf-8")
    code, line = build_cli([str(manifest), "--store", str(tmp_path / "s.zarr")], capsys)
    assert code == 2 and "malformed YAML at line" in line and str(manifest) in line
    assert_no_complete_store(tmp_path / "s.zarr")


def test_build_cli__missing_manifest(tmp_path: Path, capsys) -> None:
    _, line = build_cli([str(tmp_path / "nope.yaml")], capsys)
    assert "manifest file not found" in line


def test_build_cli__unknown_key(tmp_path: Path, tiny_gemma_dir: Path, capsys) -> None:
    manifest = tiny_manifest(tmp_path, tiny_gemma_dir, storage={"dtype": "float32", "compresion": "zstd"})
    _, line = build_cli([str(manifest), "--store", str(tmp_path / "s.zarr")], capsys)
    assert "storage.compresion: unknown key" in line
    assert_no_complete_store(tmp_path / "s.zarr")


def test_build_cli__missing_corpus_file(tmp_path: Path, tiny_gemma_dir: Path, capsys) -> None:
    manifest = tiny_manifest(tmp_path, tiny_gemma_dir)
    (tmp_path / "ben.jsonl").unlink()
    _, line = build_cli([str(manifest), "--store", str(tmp_path / "s.zarr")], capsys)
    assert "not found" in line and "ben.jsonl" in line
    assert not (tmp_path / "s.zarr").exists()


def test_build_cli__hf_dataset_unavailable_offline(tmp_path: Path, tiny_gemma_dir: Path, capsys) -> None:
    manifest = edit(tiny_manifest(tmp_path, tiny_gemma_dir), lambda d: d["corpora"].__setitem__(
        1, {"tier": "benign", "source": {"hf": "no-such-org/no-such-dataset-bra-test"}}))
    _, line = build_cli([str(manifest), "--store", str(tmp_path / "s.zarr")], capsys)
    assert "no-such-org/no-such-dataset-bra-test" in line
    assert "not reachable" in line or "gated" in line
    assert not (tmp_path / "s.zarr").exists()


def test_build_cli__layer_out_of_range(tmp_path: Path, tiny_gemma_dir: Path, capsys) -> None:
    manifest = tiny_manifest(tmp_path, tiny_gemma_dir, layers=[1, 99])
    _, line = build_cli([str(manifest), "--store", str(tmp_path / "s.zarr")], capsys)
    assert "layer 99" in line and "4 blocks" in line
    assert not (tmp_path / "s.zarr").exists()


def test_build_cli__model_not_found_offline(tmp_path: Path, tiny_gemma_dir: Path, capsys) -> None:
    manifest = tiny_manifest(tmp_path, tiny_gemma_dir, model={"id": "no-such-org/no-such-model-bra-test"})
    _, line = build_cli([str(manifest), "--store", str(tmp_path / "s.zarr")], capsys)
    assert "no-such-org/no-such-model-bra-test" in line and "not found offline" in line
    assert not (tmp_path / "s.zarr").exists()


def test_build_cli__store_under_a_file(tmp_path: Path, tiny_gemma_dir: Path, capsys) -> None:
    manifest = tiny_manifest(tmp_path, tiny_gemma_dir, layers=[0])
    (tmp_path / "somefile").write_text("not a folder")
    store = tmp_path / "somefile" / "store.zarr"
    _, line = build_cli([str(manifest), "--store", str(store)], capsys)
    assert "cannot write store" in line and str(store) in line and "somefile is not a directory" in line
    assert (tmp_path / "somefile").read_text() == "not a folder"


def test_build_cli__store_in_read_only_dir(tmp_path: Path, tiny_gemma_dir: Path, capsys) -> None:
    manifest = tiny_manifest(tmp_path, tiny_gemma_dir, layers=[0])
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running with privileges that ignore directory permissions (root)")
        _, line = build_cli([str(manifest), "--store", str(ro / "s.zarr")], capsys)
        assert "cannot write store" in line and "ermission denied" in line
        assert not (ro / "s.zarr").exists()
    finally:
        ro.chmod(stat.S_IRWXU)


def test_build_cli__disk_full(tmp_path: Path, tiny_gemma_dir: Path, capsys, monkeypatch) -> None:
    """ENOSPC while writing activation chunks: a one-line 'disk full' error, the store stays 'building', and a
    re-run once space is back resumes it."""
    import zarr.storage._local as local

    real_put = local._put
    writes = {"acts": 0}

    def put(path: Path, value, exclusive: bool = False) -> int:
        if f"{os.sep}acts{os.sep}" in str(path) and f"{os.sep}c{os.sep}" in str(path):
            writes["acts"] += 1
            if writes["acts"] > 3:  # a few shards get through, then the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", put)
    manifest = tiny_manifest(tmp_path, tiny_gemma_dir)
    store = tmp_path / "s.zarr"
    _, line = build_cli([str(manifest), "--store", str(store)], capsys)
    assert "disk full" in line and str(store) in line, line
    assert_no_complete_store(store)
    assert zarr_attrs(store)[schema.ATTR_STATUS] == schema.STATUS_BUILDING
    assert any("status is 'building'" in p for p in verify_store(store))
    monkeypatch.setattr(local, "_put", real_put)
    with pytest.raises(SystemExit) as info:
        cli_main(["build", str(manifest), "--store", str(store)])
    assert info.value.code == 0 and "resumed" in capsys.readouterr().err
    assert open_store(store).attrs[schema.ATTR_STATUS] == schema.STATUS_COMPLETE


def zarr_attrs(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]


@pytest.mark.parametrize("lines", [["", "   ", ""], ['{"id": 1, "text": "   "}', '{"id": 2, "text": ""}']])
def test_build_cli__empty_corpus_after_filtering(tmp_path: Path, tiny_gemma_dir: Path, capsys, lines) -> None:
    manifest = tiny_manifest(tmp_path, tiny_gemma_dir)
    (tmp_path / "ben.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _, line = build_cli([str(manifest), "--store", str(tmp_path / "s.zarr")], capsys)
    assert "'benign'" in line and "empty after filtering" in line
    assert not (tmp_path / "s.zarr").exists()


def test_build_cli__existing_non_store_folder(tmp_path: Path, tiny_gemma_dir: Path, capsys) -> None:
    manifest = tiny_manifest(tmp_path, tiny_gemma_dir, layers=[0])
    (tmp_path / "s.zarr").mkdir()
    (tmp_path / "s.zarr" / "mine.txt").write_text("keep me")
    _, line = build_cli([str(manifest), "--store", str(tmp_path / "s.zarr")], capsys)
    assert "not a store" in line and "--overwrite" in line
    assert (tmp_path / "s.zarr" / "mine.txt").read_text() == "keep me"
    _, line = build_cli([str(manifest), "--store", str(tmp_path / "s.zarr"), "--overwrite"], capsys)
    assert "not a store" in line and "refusing to delete" in line
    assert (tmp_path / "s.zarr" / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("command", ["info", "verify"])
def test_cache_cli__missing_store(tmp_path: Path, capsys, command: str) -> None:
    with pytest.raises(SystemExit) as info:
        cli_main([command, str(tmp_path / "nope.zarr")])
    errors = error_lines(capsys.readouterr().err)
    assert info.value.code != 0 and len(errors) == 1


def test_build_cli__subprocess_one_error_line(tmp_path: Path, tiny_gemma_dir: Path) -> None:
    """The real console entry point: exit code 2 and one error line among the logs."""
    manifest = tiny_manifest(tmp_path, tiny_gemma_dir, layers=[7])
    proc = subprocess.run([sys.executable, "-m", "bra.cache", "build", str(manifest), "--store",
                           str(tmp_path / "s.zarr")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "layer 7" in errors[0] and "4 blocks" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(("content", "fragment"), [
    (b"name: x\nmodel: caf\xe9\n", "line 2: not valid UTF-8 (byte 11)"),
    (b"name: x\r\nmodel: a\r\nlayers: [\xff]\r\n", "line 3: not valid UTF-8 (byte 10)"),
    (b'name: "x\\ud800"\nmodel: a\n', "name: holds invalid Unicode (lone surrogate '\\ud800')"),
    (b'name: x\nmodel: {id: a, "rev\\udfff": 1}\n', "model.rev\\udfff: holds invalid Unicode"),
])
def test_build_cli__manifest_not_unicode(tmp_path: Path, capsys, content: bytes, fragment: str) -> None:
    manifest = tmp_path / "bad.yaml"
    manifest.write_bytes(content)
    code, line = build_cli([str(manifest), "--store", str(tmp_path / "s.zarr")], capsys)
    assert code == 2 and line.startswith(f"error: {manifest}: ") and fragment in line, line
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(("record", "fragment"), [
    ('{"id": "s", "text": "half \\ud800 pair"}',
     "ben.jsonl:13: field 'text' holds invalid Unicode (lone surrogate '\\ud800' at character 6)"),
    ('{"id": "bad\\udfff", "text": "fine"}', "ben.jsonl:13: field 'id' holds invalid Unicode"),
])
def test_build_cli__corpus_lone_surrogate(tmp_path: Path, tiny_gemma_dir: Path, capsys, record: str,
                                          fragment: str) -> None:
    """A JSON escape of half a surrogate pair: the tokenizer would raise a bare TypeError."""
    manifest = tiny_manifest(tmp_path, tiny_gemma_dir)
    with open(tmp_path / "ben.jsonl", "a", encoding="utf-8") as fh:
        fh.write(record + "\n")  # after the 12 documents tiny_manifest writes
    _, line = build_cli([str(manifest), "--store", str(tmp_path / "s.zarr")], capsys)
    assert fragment in line, line
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(("name", "content", "fragment"), [
    ("ben.jsonl", b'{"id": "a", "text": "fine"}\n{"id": "b", "text": "caf\xe9"}\n',
     "ben.jsonl:2: not valid UTF-8 (byte 25)"),
    ("ben.txt", b"First paragraph.\r\n\r\nSecond \xff paragraph.\r\n", "ben.txt:3: not valid UTF-8 (byte 8)"),
])
def test_build_cli__corpus_not_utf8(tmp_path: Path, tiny_gemma_dir: Path, capsys, name: str, content: bytes,
                                    fragment: str) -> None:
    manifest = edit(tiny_manifest(tmp_path, tiny_gemma_dir), lambda d: d["corpora"].__setitem__(
        1, {"tier": "benign", "source": {"path": str(tmp_path / name)}}))
    (tmp_path / name).write_bytes(content)
    _, line = build_cli([str(manifest), "--store", str(tmp_path / "s.zarr")], capsys)
    assert fragment in line, line
    assert not (tmp_path / "s.zarr").exists()


def test_build_cli__eval_prompt_lone_surrogate(tmp_path: Path, tiny_gemma_dir: Path, capsys) -> None:
    from helpers import write_eval_set

    prompts = write_eval_set(tmp_path / "set.jsonl")
    lines = prompts.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[4])
    record["prompt"] = "Tell me about \ud800 cells"
    lines[4] = json.dumps(record)  # ASCII JSON: the surrogate is the escape \ud800
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    manifest = write_manifest(tmp_path / "eval.yaml", {
        "name": "e", "model": {"id": str(tiny_gemma_dir), "attn_implementation": "eager"}, "layers": [1],
        "max_seq_len": 128, "prompt_sets": [str(prompts)], "generation": {"max_new_tokens": 2}})
    _, line = build_cli([str(manifest), "--store", str(tmp_path / "s.zarr")], capsys)
    assert f"{prompts}:5: field 'prompt' holds invalid Unicode (lone surrogate '\\ud800'" in line, line
    assert not (tmp_path / "s.zarr").exists()


# ------------------------------------------------------------------------------- generation variants

SYSTEM_REFUSED = ("{% if messages[0]['role'] == 'system' %}"
                  "{{ raise_exception('System role not supported') }}{% endif %}"
                  "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
                  "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def variant_manifest(tmp_path: Path, model_dir: Path, variants: object) -> Path:
    """A small eval manifest with ``variants`` as its generation.variants."""
    from helpers import write_eval_set

    return write_manifest(tmp_path / "eval.yaml", {
        "name": "e", "model": {"id": str(model_dir), "attn_implementation": "eager"}, "layers": [1],
        "max_seq_len": 128, "prompt_sets": [str(write_eval_set(tmp_path / "set.jsonl"))],
        "generation": {"max_new_tokens": 2, "variants": variants}})


def model_with_template(src: Path, dst: Path, template: str | None) -> Path:
    """A copy of the tiny model whose tokenizer has ``template`` as its chat template (None: none)."""
    import shutil

    copy = Path(shutil.copytree(src, dst))
    (copy / "chat_template.jinja").unlink()
    config = json.loads((copy / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    (copy / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return copy


def assert_no_stores(tmp_path: Path) -> None:
    assert not list(tmp_path.glob("*.zarr")), sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("variants, key, words", [
    (["a", {"name": "a", "prefill": "Sure"}], "generation.variants[1].name", "duplicate variant name 'a'"),
    ([{"name": "a", "temperature": 0.7}], "generation.variants[0].temperature", "unknown key"),
    ([{"name": "a", "max_new_tokens": 0}], "generation.variants[0].max_new_tokens", "must be positive"),
    ([{"name": "a", "prefill": ""}], "generation.variants[0].prefill", "must not be empty"),
])
def test_build_cli__bad_variant(tmp_path: Path, tiny_gemma_dir: Path, capsys, variants: list, key: str,
                                words: str) -> None:
    manifest = variant_manifest(tmp_path, tiny_gemma_dir, variants)
    _, line = build_cli([str(manifest), "--store", str(tmp_path / "s.zarr")], capsys)
    assert f"{manifest}: {key}: " in line and words in line, line
    assert_no_stores(tmp_path)


def test_build_cli__variant_template_the_tokenizer_lacks(tmp_path: Path, tiny_gemma_dir: Path,
                                                         capsys) -> None:
    """The first variant (no template) would build; the second needs a template the tokenizer lacks: the
    build fails before writing either store."""
    model = model_with_template(tiny_gemma_dir, tmp_path / "model", None)
    manifest = variant_manifest(tmp_path, model, [{"name": "raw", "chat_template": False}, "chat"])
    _, line = build_cli([str(manifest), "--store", str(tmp_path / "s.zarr")], capsys)
    assert line.startswith("error: generation.variants[1].chat_template: tokenizer ") and \
        "has no chat template; set chat_template: false" in line, line
    assert_no_stores(tmp_path)


def test_build_cli__variant_system_turn_the_template_refuses(tmp_path: Path, tiny_gemma_dir: Path,
                                                            capsys) -> None:
    model = model_with_template(tiny_gemma_dir, tmp_path / "model", SYSTEM_REFUSED)
    manifest = variant_manifest(tmp_path, model, ["canonical", {"name": "sys", "system_prompt": "Be brief."}])
    _, line = build_cli([str(manifest), "--store", str(tmp_path / "s.zarr")], capsys)
    assert line.startswith("error: generation.variants[1].system_prompt: the chat template of ") and \
        line.endswith("refuses a system turn (System role not supported)"), line
    assert_no_stores(tmp_path)
