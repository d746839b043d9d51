"""Scoring reads stores read-only: `bra-sae score`/`eval` and `bra-cache info`/`verify` leave every byte (and
every directory listing) of a store as it was, open it with a read-only handle, and work on a store that the
process has no permission to write (files 0444, folders 0555, run unprivileged when the tests run as root)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bra.cache.store import open_store
from bra.cli.cache import main as cache_main
from bra.sae.formats import save_saelens
from bra.sae.model import SAEConfig, TopKSAE

pytestmark = pytest.mark.usefixtures("one_thread")

def tree_state(root: Path) -> dict[str, object]:
    """Every entry under ``root``: a file's sha256, a folder's sorted listing (so a temp file created and
    removed again is caught by nothing but its effect; the listing catches any file left behind)."""
    state: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        state[rel] = sorted(c.name for c in p.iterdir()) if p.is_dir() else \
            hashlib.sha256(p.read_bytes()).hexdigest()
    return state


def sae_for(store_model: Path, directory: Path) -> Path:
    cfg = SAEConfig(d_model=64, d_sae=48, k=4, model_name=str(store_model),
                    hook_name="blocks.1.hook_resid_post", layer=1)
    return save_saelens(TopKSAE.init_random(cfg, seed=5), directory)


def run(main, argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return int(info.value.code or 0)


def test_open_store__read_only_handle(labelled_eval_store: tuple[Path, Path]) -> None:
    store = open_store(labelled_eval_store[0])
    assert store.group.read_only and store.group.store.read_only
    with pytest.raises(ValueError, match="read-only"):
        store.group.attrs["status"] = "building"
    with pytest.raises(ValueError, match="read-only"):
        store.array("mask")[0:2] = True


def test_info_verify__leave_the_store_byte_identical(labelled_eval_store: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    """(score and eval: the next test, which also hashes the store before and after.)"""
    store = Path(shutil.copytree(labelled_eval_store[0], tmp_path / "eval.zarr"))
    before = tree_state(store)
    assert run(cache_main, ["info", str(store)]) == 0
    assert run(cache_main, ["verify", str(store)]) == 0
    assert tree_state(store) == before


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A folder an unprivileged user can enter (pytest's own temp folders are private to their owner)."""
    path = Path(tempfile.mkdtemp(prefix="bra-readonly-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for p in [path, *path.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(path, ignore_errors=True)


def freeze(root: Path) -> None:
    """Files 0444, folders 0555: nobody but root may write (the unprivileged run below is not root)."""
    for p in sorted(root.rglob("*"), reverse=True):
        p.chmod(0o555 if p.is_dir() else 0o444)
    root.chmod(0o555)


SCRIPT = """
import json, sys
from pathlib import Path
from bra.cli.sae import main
store, sae, out = sys.argv[1:4]
try:
    open(Path(store) / "probe", "w")
    writable = True
except PermissionError:
    writable = False
codes = []
for argv in (["score", "--store", store, "--sae", sae, "--out", out, "--n-boot", "10", "--n-perm", "10",
              "--repeats", "1"],
             ["eval", "--sae", sae, "--store", store, "--split", "all"]):
    try:
        main(argv)
        codes.append(0)
    except SystemExit as exc:
        codes.append(exc.code)
print(json.dumps({"writable": writable, "codes": codes}))
"""


def test_score_eval__work_on_a_store_the_process_cannot_write(labelled_eval_store: tuple[Path, Path],
                                                               world_dir: Path) -> None:
    prefix: list[str] = []
    if os.geteuid() == 0:  # root ignores permission bits: run as nobody
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop privileges")
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    store = Path(shutil.copytree(labelled_eval_store[0], world_dir / "eval.zarr"))
    sae = sae_for(labelled_eval_store[1], world_dir / "sae")
    before = tree_state(store)
    freeze(store)
    freeze(sae)
    (world_dir / "out").mkdir()
    (world_dir / "out").chmod(0o777 | stat.S_ISVTX)
    env = {**os.environ, "HOME": str(world_dir / "out"), "MPLCONFIGDIR": str(world_dir / "out" / "mpl"),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PYTHONDONTWRITEBYTECODE": "1"}
    argv = [*prefix, sys.executable, "-c", SCRIPT, str(store), str(sae), str(world_dir / "out" / "r")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["writable"] is False  # the premise: this process cannot write into the store
    assert result["codes"] == [0, 0], proc.stderr[-3000:]
    assert (world_dir / "out" / "r" / "report.json").is_file()
    assert tree_state(store) == before
