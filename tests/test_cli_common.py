"""bra/cli/common.py: `--nproc N` re-runs the same command under torchrun (the relaunched argv must parse to
the same values), and is refused inside torchrun."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import bra.dist
from bra.cli.cache import cli as cache_cli
from bra.cli.common import run_cli
from bra.cli.sae import cli as sae_cli


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str], int]]:
    """Calls to ``bra.dist.launch`` (recorded instead of starting torchrun; exit code 0)."""
    calls: list[tuple[str, list[str], int]] = []

    def fake_launch(module: str, argv: list[str], nproc: int) -> int:
        calls.append((module, list(argv), nproc))
        return 0

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(bra.dist, "launch", fake_launch)
    return calls


def parsed(group: Any, argv: list[str]) -> dict[str, Any]:
    """The parameters ``argv`` (group flags, then the subcommand) gives its subcommand (parsed, not run)."""
    args = [a for a in argv if a != "-v"]  # the only group flag these tests use
    sub = group.get_command(None, args[0])
    return dict(sub.make_context(sub.name, args[1:]).params)


def test_fit_nproc__relaunches_with_the_same_flags(launched, tmp_path: Path) -> None:
    argv = ["-v", "fit", "--store", "s3://bucket/x.zarr", "--out", str(tmp_path / "run"), "--preset", "plain",
            "--d-sae", "64", "--k", "4", "--lr", "0.002", "--shuffle-tiers", "--no-balanced",
            "--resume", "--nproc", "2"]
    with pytest.raises(SystemExit) as exit_:
        run_cli(sae_cli, argv)
    assert exit_.value.code == 0
    [(module, relaunch, nproc)] = launched
    assert (module, nproc) == ("bra.cli.sae", 2)
    assert "--nproc" not in relaunch and relaunch[:2] == ["-v", "fit"]
    want = parsed(sae_cli, argv)
    got = parsed(sae_cli, relaunch)
    assert {k: v for k, v in got.items() if k != "nproc"} == {k: v for k, v in want.items() if k != "nproc"}
    assert got["nproc"] == 1 and got["shuffle_tiers"] is True and got["balanced"] is False


def test_fit_nproc__bad_flags_fail_before_launching(launched, tmp_path: Path, capsys) -> None:
    code = run_cli(sae_cli, ["fit", "--store", str(tmp_path), "--out", str(tmp_path / "r"), "--k", "0",
                             "--nproc", "2"])
    assert code != 0 and not launched
    assert capsys.readouterr().err.startswith("error: ")


def test_build_nproc__relaunches_with_the_same_arguments(launched, tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    argv = ["build", str(manifest), "--store", "memory://x.zarr", "--overwrite", "--nproc", "3"]
    with pytest.raises(SystemExit):
        run_cli(cache_cli, argv)
    [(module, relaunch, nproc)] = launched
    assert (module, nproc) == ("bra.cli.cache", 3)
    assert relaunch == ["build", str(manifest), "--store", "memory://x.zarr", "--overwrite"]


def test_nproc_inside_torchrun__refused(launched, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        capsys) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = run_cli(cache_cli, ["build", str(tmp_path / "m.yaml"), "--nproc", "2"])
    assert code != 0 and not launched
    assert "inside torchrun" in capsys.readouterr().err
