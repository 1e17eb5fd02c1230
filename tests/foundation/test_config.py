"""Configs: YAML + dotted overrides; unknown keys, wrong types and bad ranges name the key."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from llmray.config import ConfigError, apply_overrides, build, check, load, parse_override, to_dict


@dataclass(frozen=True)
class Opt:
    lr: float = 1e-3
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)

    def __post_init__(self) -> None:
        check(self.lr > 0, "optimizer.lr", f"must be > 0, got {self.lr}")


@dataclass(frozen=True)
class Cfg:
    name: str = "run"
    steps: int = 10
    zero: Literal[0, 1, 2, 3] = 1
    resume: str | None = None
    optimizer: Opt = field(default_factory=Opt)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 5\noptimizer:\n  lr: 3e-4\n")
    cfg = load(Cfg, p, ["optimizer.betas=[0.8, 0.9]", "zero=3", "resume=null"])
    assert cfg.steps == 5 and cfg.zero == 3 and cfg.resume is None
    assert cfg.optimizer.lr == pytest.approx(3e-4)  # YAML's "3e-4" string becomes a float
    assert cfg.optimizer.betas == (0.8, 0.9)
    assert to_dict(cfg)["optimizer"]["betas"] == [0.8, 0.9]


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer.lrr'.*allowed.*betas, lr"):
        build(Cfg, {"optimizer": {"lrr": 1}})


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"^steps: expected an integer, got 'ten'"):
        build(Cfg, {"steps": "ten"})


def test_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"zero: 4 is not allowed; allowed values: 0, 1, 2, 3"):
        build(Cfg, {"zero": 4})


def test_range_check_names_key():
    with pytest.raises(ConfigError, match=r"optimizer.lr: must be > 0"):
        build(Cfg, {"optimizer": {"lr": -1}})


@pytest.mark.parametrize("bad", ["steps", "=3", "a..b=1", "steps=[1,"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError, match="bad override"):
        parse_override(bad)


def test_override_into_scalar_is_refused():
    with pytest.raises(ConfigError, match="steps is not a section"):
        apply_overrides({"steps": 3}, ["steps.x=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load(Cfg, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        load(Cfg, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load(Cfg, lst)


def test_configs_are_frozen():
    cfg = Cfg()
    with pytest.raises(Exception):
        cfg.steps = 3  # type: ignore[misc]


@dataclass(frozen=True)
class Role:
    optimizer: Opt = field(default_factory=lambda: Opt(lr=1e-5, betas=(0.5, 0.6)))


def test_partial_nested_mapping_keeps_the_fields_own_default():
    """`actor.optimizer.lr=...` must not reset the other optimizer keys to the class defaults."""
    cfg = load(Role, None, ["optimizer.lr=2e-4"])
    assert cfg.optimizer.lr == pytest.approx(2e-4)
    assert cfg.optimizer.betas == (0.5, 0.6)  # the role's default, not Opt's (0.9, 0.95)
    assert build(Role, {}).optimizer.lr == pytest.approx(1e-5)
