"""bra.cli.options / bra.configs: click options generated from the config dataclasses, the config built back
from them, and `fit`/`score` offering exactly the flags they offered when they were typed by hand."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import click
import pytest

from bra.audit.config import ScoreConfig
from bra.cli.cache import cli as cache_cli
from bra.cli.common import run_cli
from bra.cli.options import ConfigOptions
from bra.cli.sae import cli as sae_cli
from bra.configs import config_fields, field_docs, flat_values, from_flat, strip_optional
from bra.sae.config import PRESETS, TrainConfig

UNSET = "UNSET"  # click's "no default" sentinel, whatever its repr in this click version
Row = tuple[Any, ...]

# (opts, secondary opts, param name, type, default, is_flag, required, multiple, [default: …] in the help):
# each command's options as the hand-written code before bra.cli.options produced them (commit 145d377).
FIT_OPTIONS: list[Row] = [
    (('--store',), (), 'store', 'path_or_url', UNSET, False, True, False, None),
    (('--out',), (), 'out', 'path', UNSET, False, True, False, None),
    (('--preset',), (), 'preset', ('choice', ('contrastive', 'plain', 'seed')), None, False, False, False,
     None),
    (('--resume',), (), 'resume', 'boolean', UNSET, True, False, False, None),
    (('--nproc',), (), 'nproc', 'integer range', 1, False, False, False, '1; x>=1'),
    (('--d-sae',), (), 'd_sae', 'integer', None, False, False, False, '6144'),
    (('--k',), (), 'k', 'integer', None, False, False, False, '32'),
    (('--lr',), (), 'lr', 'float', None, False, False, False, '0.0003'),
    # added with the fitted encoder init (issue 18's quality study)
    (('--encoder-init',), (), 'encoder_init', ('choice', ('fitted', 'transpose')), None, False, False, False,
     'fitted'),
    (('--lr-decay-frac',), (), 'lr_decay_frac', 'float', None, False, False, False, '0.2'),
    (('--weight-decay',), (), 'weight_decay', 'float', None, False, False, False, '0.0'),
    (('--steps',), (), 'steps', 'integer', None, False, False, False, '5000'),
    (('--batch-size',), (), 'batch_size', 'integer', None, False, False, False, '4096'),
    (('--seed',), (), 'seed', 'integer', None, False, False, False, '0'),
    (('--layer',), (), 'layer', 'integer', None, False, False, False, 'None'),
    (('--recon-coef',), (), 'recon_coef', 'float', None, False, False, False, '1.0'),
    (('--l1-coef',), (), 'l1_coef', 'float', None, False, False, False, '0.0'),
    (('--auxk-coef',), (), 'auxk_coef', 'float', None, False, False, False, '0.03125'),
    (('--k-aux',), (), 'k_aux', 'integer', None, False, False, False, 'None'),
    (('--dead-tokens',), (), 'dead_tokens', 'integer', None, False, False, False, '10000000'),
    # the one change: a Literal field is a click.Choice (before, 'text', and __post_init__ refused the rest)
    (('--contrastive',), (), 'contrastive', ('choice', ('ntxent', 'cosine', 'none')), None, False, False,
     False, 'ntxent'),
    (('--contrastive-coef',), (), 'contrastive_coef', 'float', None, False, False, False, '0.1'),
    (('--temperature',), (), 'temperature', 'float', None, False, False, False, '0.1'),
    (('--contrastive-level',), (), 'contrastive_level', ('choice', ('token', 'doc')), None, False, False,
     False, 'token'),
    (('--contrastive-rows',), (), 'contrastive_rows', 'integer', None, False, False, False, '512'),
    (('--balanced',), ('--no-balanced',), 'balanced', 'boolean', None, True, False, False, 'True'),
    (('--shuffle-tiers',), ('--no-shuffle-tiers',), 'shuffle_tiers', 'boolean', None, True, False, False,
     'False'),
    (('--heldout-fraction',), (), 'heldout_fraction', 'float', None, False, False, False, '0.1'),
    (('--buffer-rows',), (), 'buffer_rows', 'integer', None, False, False, False, '65536'),
    (('--checkpoint-every',), (), 'checkpoint_every', 'integer', None, False, False, False, '500'),
    (('--log-every',), (), 'log_every', 'integer', None, False, False, False, '10'),
    (('--device',), (), 'device', 'text', None, False, False, False, 'auto'),
]

SCORE_OPTIONS: list[Row] = [
    (('--store',), (), 'store', 'path_or_url', UNSET, False, True, False, None),
    (('--sae',), (), 'sae_path', 'path', UNSET, False, True, False, None),
    (('--out',), (), 'out', 'path', UNSET, False, True, False, None),
    (('--baseline',), (), 'baseline', 'text', UNSET, False, False, True, None),
    (('--seed',), (), 'seed', 'integer', 0, False, False, False, '0'),
    (('--pool',), (), 'pool', ('choice', ('mean', 'max')), 'mean', False, False, False, 'mean'),
    (('--layer',), (), 'layer', 'integer', None, False, False, False, None),
    (('--f-segment',), (), 'f_segment', ('choice', ('prompt', 'completion')), 'completion', False, False,
     False, 'completion'),
    (('--probe-segment',), (), 'probe_segment', ('choice', ('prompt', 'completion', 'both')), 'both', False,
     False, False, 'both'),
    (('--train-fraction',), (), 'train_fraction', 'float', 0.5, False, False, False, '0.5'),
    (('--calibration-fraction',), (), 'calibration_fraction', 'float', 0.25, False, False, False, '0.25'),
    (('--ridge',), (), 'ridge', 'float', 0.01, False, False, False, '0.01'),
    (('--top-n',), (), 'top_n', 'integer', 16, False, False, False, '16'),
    (('--min-effect',), (), 'min_effect', 'float', 0.0, False, False, False, '0.0'),
    # issue 13: the catalog's FDR and null, the calibrated depth scale, D's calibration, repeated splits
    # (replacing the fixed --d-threshold and --hazard-threshold)
    (('--fdr',), (), 'fdr', 'float', 0.05, False, False, False, '0.05'),
    (('--n-null',), (), 'n_null', 'integer', 20, False, False, False, '20'),
    (('--depth-quantile',), (), 'depth_quantile', 'float', 0.1, False, False, False, '0.1'),
    (('--min-reference',), (), 'min_reference', 'integer', 3, False, False, False, '3'),
    (('--d-quantile',), (), 'd_quantile', 'float', 0.95, False, False, False, '0.95'),
    (('--magnitude-quantile',), (), 'magnitude_quantile', 'float', 0.05, False, False, False, '0.05'),
    (('--n-d-null',), (), 'n_d_null', 'integer', 200, False, False, False, '200'),
    (('--repeats',), (), 'repeats', 'integer', 5, False, False, False, '5'),
    (('--n-boot',), (), 'n_boot', 'integer', 1000, False, False, False, '1000'),
    (('--n-perm',), (), 'n_perm', 'integer', 1000, False, False, False, '1000'),
    (('--contexts',), (), 'contexts', 'integer', 3, False, False, False, '3'),
    (('--context-latents',), (), 'context_latents', 'integer', 4, False, False, False, '4'),
    # added with the choice of tier classes (issue 16): one comma-separated value each, None = not given
    (('--positive-tiers',), (), 'positive_tiers', 'comma-list', None, False, False, False, None),
    (('--negative-tiers',), (), 'negative_tiers', 'comma-list', None, False, False, False, None),
    # added with the judges (issue 15): which surface labels the run uses
    (('--labels',), (), 'labels', ('choice', ('auto', 'rules', 'judges', 'consensus')), 'auto', False, False,
     False, 'auto'),
]


def _help(option: click.Option, ctx: click.Context) -> str:
    record = option.get_help_record(ctx)
    return " ".join((record[1] if record else "").split())


def option_rows(group: click.Group, name: str) -> list[Row]:
    """What ``--help`` shows of each option of a subcommand (see FIT_OPTIONS for the columns)."""
    cmd = group.get_command(click.Context(group), name)
    assert cmd is not None
    ctx = click.Context(cmd, info_name=name)
    rows: list[Row] = []
    for p in cmd.params:
        assert isinstance(p, click.Option)
        shown = re.search(r"\[default: ([^\]]*)\]", _help(p, ctx))
        kind = ("choice", tuple(p.type.choices)) if isinstance(p.type, click.Choice) else p.type.name
        default = UNSET if "UNSET" in repr(p.default) else p.default
        rows.append((tuple(p.opts), tuple(p.secondary_opts), p.name, kind, default, p.is_flag, p.required,
                     p.multiple, shown.group(1) if shown else None))
    return rows


# Small configs standing for a stage config with a nested one (as TrainConfig's reader settings will be).

@dataclass(frozen=True)
class Reader:
    """Test config: how rows are read."""

    buffer_rows: int = 64
    """Shuffle-buffer rows."""
    mode: Literal["fast", "safe"] = "safe"
    """Read mode."""


@dataclass(frozen=True)
class Job:
    """Test config with a nested one, an optional, a bool and a validation."""

    steps: int = 3
    """Optimizer steps."""
    reader: Reader = field(default_factory=lambda: Reader(buffer_rows=128))
    """How rows are read (flattened)."""
    fast: bool = False
    """Go fast."""
    layer: int | None = None
    """Layer; None = the first."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be positive, got {self.steps}")


@dataclass(frozen=True)
class Clash:
    """Test config whose nested field repeats an outer name."""

    buffer_rows: int = 1
    """Outer rows."""
    reader: Reader = field(default_factory=Reader)
    """Inner rows too."""


@dataclass(frozen=True)
class Unsupported:
    """Test config with a field no option can take."""

    layers: tuple[int, ...] = (1,)
    """Layers."""


@dataclass(frozen=True)
class Names:
    """Test config with tuple-of-str fields."""

    names: tuple[str, ...] = ("a", "b")
    """Names."""
    picked: tuple[str, ...] | None = None
    """Picked names; None = all."""


def _command(options: ConfigOptions[Any], seen: list[Any]) -> click.Command:
    @click.command()
    @options
    def cmd(**params: Any) -> None:
        seen.append(options.build(params))

    return cmd


def _run(options: ConfigOptions[Any], *argv: str) -> Any:
    seen: list[Any] = []
    _command(options, seen).main(list(argv), standalone_mode=False)
    [config] = seen
    return config


def test_fit_options__match_the_hand_written_flags() -> None:
    assert option_rows(sae_cli, "fit") == FIT_OPTIONS


def test_score_options__match_the_hand_written_flags() -> None:
    assert option_rows(sae_cli, "score") == SCORE_OPTIONS


@pytest.mark.parametrize("command, cls", [("fit", TrainConfig), ("score", ScoreConfig)])
def test_config_options__help_is_the_field_docstring(command: str, cls: type) -> None:
    cmd = sae_cli.get_command(click.Context(sae_cli), command)
    assert cmd is not None
    ctx = click.Context(cmd, info_name=command)
    helps = {p.name: _help(p, ctx) for p in cmd.params if isinstance(p, click.Option)}
    leaves = config_fields(cls)  # nested configs (TrainConfig.stream) contribute their leaf fields
    assert leaves
    for leaf in leaves:
        assert helps[leaf.name].startswith(" ".join(leaf.doc.split())), leaf.name


def test_cli_commands__parameter_names_are_unique() -> None:
    for group in (sae_cli, cache_cli):
        for name in group.list_commands(click.Context(group)):
            cmd = group.get_command(click.Context(group), name)
            assert cmd is not None
            names = [p.name for p in cmd.params]
            assert len(names) == len(set(names)), (name, names)


def test_config_options__flattens_a_nested_config() -> None:
    cmd = _command(ConfigOptions(Job), [])
    ctx = click.Context(cmd, info_name="cmd")
    rows = {p.name: p for p in cmd.params if isinstance(p, click.Option)}
    assert list(rows) == ["steps", "buffer_rows", "mode", "fast", "layer"]
    assert rows["buffer_rows"].opts == ["--buffer-rows"] and rows["buffer_rows"].default == 128
    assert isinstance(rows["mode"].type, click.Choice) and list(rows["mode"].type.choices) == ["fast", "safe"]
    assert rows["fast"].is_flag and rows["fast"].secondary_opts == ["--no-fast"]
    assert rows["layer"].type is click.INT and rows["layer"].default is None
    assert _help(rows["buffer_rows"], ctx) == "Shuffle-buffer rows. [default: 128]"


def test_config_options__builds_the_nested_config_back() -> None:
    options = ConfigOptions(Job)
    assert _run(options) == Job()
    assert _run(options, "--buffer-rows", "7") == Job(reader=Reader(buffer_rows=7))
    assert _run(options, "--mode", "fast", "--fast", "--layer", "2") == \
        Job(reader=Reader(buffer_rows=128, mode="fast"), fast=True, layer=2)


def test_config_options__defaults_none_lets_a_base_fill_what_is_not_given() -> None:
    options = ConfigOptions(Job, defaults_none=True)
    cmd = _command(options, [])
    params = cmd.make_context("cmd", ["--steps", "5"]).params
    assert params == {"steps": 5, "buffer_rows": None, "mode": None, "fast": None, "layer": None}
    assert options.build(params, base={"steps": 9, "mode": "fast", "fast": True}) == \
        Job(steps=5, reader=Reader(buffer_rows=128, mode="fast"), fast=True)
    ctx = click.Context(cmd, info_name="cmd")
    helps = {p.name: _help(p, ctx) for p in cmd.params if isinstance(p, click.Option)}
    assert helps["buffer_rows"] == "Shuffle-buffer rows. [default: 128]"
    assert helps["fast"] == "Go fast. [default: False]"


def test_config_options__refused_value_is_a_one_line_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    options = ConfigOptions(Job)
    with pytest.raises(click.UsageError, match="steps must be positive, got 0"):
        _run(options, "--steps", "0")
    group = click.Group("g", commands={"cmd": _command(options, [])})
    assert run_cli(group, ["cmd", "--mode", "slow"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: Invalid value for '--mode'")


def test_config_options__name_clash_fails_at_definition() -> None:
    with pytest.raises(TypeError, match="'buffer_rows' appears twice"):
        ConfigOptions(Clash)

    @click.option("--steps", type=int)
    def cmd(**_: Any) -> None:
        pass

    with pytest.raises(TypeError, match="clash with the command's own: steps"):
        ConfigOptions(Job)(cmd)


def test_config_options__unsupported_type_fails_at_definition() -> None:
    with pytest.raises(TypeError, match="Unsupported.layers: no click option"):
        ConfigOptions(Unsupported)


def test_config_options__rename_and_exclude() -> None:
    options = ConfigOptions(Job, exclude=("layer",), rename={"buffer_rows": "rows"})
    cmd = _command(options, [])
    assert [p.opts[0] for p in cmd.params] == ["--steps", "--rows", "--mode", "--fast"]
    assert _run(options, "--rows", "9") == Job(reader=Reader(buffer_rows=9))
    with pytest.raises(TypeError, match="no field 'nope'"):
        ConfigOptions(Job, exclude=("nope",))


def test_config_fields__flatten_and_rebuild() -> None:
    leaves = config_fields(Job)
    assert [leaf.path for leaf in leaves] == [("steps",), ("reader", "buffer_rows"), ("reader", "mode"),
                                              ("fast",), ("layer",)]
    assert leaves[1].default == 128 and leaves[4].optional and leaves[4].type is int
    job = Job(steps=4, reader=Reader(buffer_rows=5, mode="fast"), layer=1)
    assert from_flat(Job, flat_values(job)) == job
    with pytest.raises(TypeError, match="no field nope"):
        from_flat(Job, {"nope": 1})
    assert strip_optional(int | None) == (int, True) and strip_optional(int) == (int, False)
    assert field_docs(Reader) == {"buffer_rows": "Shuffle-buffer rows.", "mode": "Read mode."}


def test_fit_cmd__preset_fills_values_not_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import bra.sae.workflows

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(bra.sae.workflows, "fit_in_process_group",
                        lambda store, out, cfg, resume=False: calls.append((store, out, cfg, resume)) or True)
    argv = ["fit", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--preset", "seed",
            "--k", "8", "--no-balanced"]
    assert run_cli(sae_cli, argv) == 0
    [(store, out, cfg, resume)] = calls
    assert (store, out, resume) == (tmp_path / "s", tmp_path / "o", False)
    assert cfg == TrainConfig(**{**PRESETS["seed"], "k": 8, "balanced": False})


def test_score_cmd__builds_the_config_and_baselines(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import bra.audit.score

    calls: list[tuple[Any, ...]] = []

    def fake_score(store: Any, sae: Any, out: Any, cfg: Any, baselines: Any) -> dict[str, Any]:
        calls.append((store, sae, out, cfg, baselines))
        return {"auroc": [{"method": "sae", "segment": "both", "auroc": 0.5}],
                "depth": {"verdicts": {"deep": 0, "shallow": 0, "uncertain": 0}, "n_refused_test": 0}}

    monkeypatch.setattr(bra.audit.score, "score", fake_score)
    base = ["score", "--store", "memory://e.zarr", "--sae", str(tmp_path / "sae"), "--out",
            str(tmp_path / "o")]
    assert run_cli(sae_cli, [*base, "--pool", "max", "--n-boot", "10", "--baseline", "a=x", "--baseline",
                             "b=y"]) == 0
    [(store, sae, out, cfg, baselines)] = calls
    assert (store, sae, out) == ("memory://e.zarr", tmp_path / "sae", tmp_path / "o")
    assert cfg == ScoreConfig(pool="max", n_boot=10)
    assert baselines == {"a": Path("x"), "b": Path("y")}
    capsys.readouterr()
    assert run_cli(sae_cli, [*base, "--baseline", "a=x", "--baseline", "a=y"]) == 2
    assert "baseline names must be unique" in capsys.readouterr().err
    assert len(calls) == 1


def test_config_options__tuple_of_str_is_one_comma_separated_value() -> None:
    options = ConfigOptions(Names)
    cmd = _command(options, [])
    ctx = click.Context(cmd, info_name="cmd")
    rows = {p.name: p for p in cmd.params if isinstance(p, click.Option)}
    assert rows["names"].type.name == "comma-list" and rows["names"].default == ("a", "b")
    assert _help(rows["names"], ctx) == "Names. [default: a, b]"  # click's rendering; items are stripped
    assert rows["picked"].default is None and _help(rows["picked"], ctx) == "Picked names; None = all."
    assert "--picked A,B,..." in cmd.get_help(ctx)
    assert _run(options) == Names()
    assert _run(options, "--names", " x, y ", "--picked", "z") == Names(names=("x", "y"), picked=("z",))
    # an empty value and blank items reach the config as given, for its __post_init__ to refuse
    assert _run(options, "--picked", "") == Names(picked=())
    assert _run(options, "--picked", "a,,b") == Names(picked=("a", "", "b"))
    assert _run(ConfigOptions(Names, defaults_none=True)) == Names()


def test_score_cmd__tier_classes_are_comma_separated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import bra.audit.score

    calls: list[Any] = []
    monkeypatch.setattr(bra.audit.score, "score", lambda store, sae, out, cfg, baselines:
                        calls.append(cfg) or {"auroc": [], "depth": {"verdicts": {}, "n_refused_test": 0}})
    base = ["score", "--store", "memory://e.zarr", "--sae", str(tmp_path / "sae"), "--out",
            str(tmp_path / "o")]
    assert run_cli(sae_cli, [*base, "--positive-tiers", "hazard_adjacent_legal,psilocybin_control",
                             "--negative-tiers", "benign_legal"]) == 0
    assert calls == [ScoreConfig(positive_tiers=("hazard_adjacent_legal", "psilocybin_control"),
                                 negative_tiers=("benign_legal",))]
    for argv, expect in ((["--positive-tiers", ""], "positive_tiers is empty"),
                         (["--negative-tiers", "benign_bio,,x"], "negative_tiers has an empty tier name"),
                         (["--positive-tiers", "a,b,a"], "positive_tiers names tier 'a' twice"),
                         (["--positive-tiers", "a,b", "--negative-tiers", "b"],
                          "tier 'b' is in both positive_tiers and negative_tiers")):
        capsys.readouterr()
        assert run_cli(sae_cli, [*base, *argv]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and expect in err[0], err
    assert len(calls) == 1
