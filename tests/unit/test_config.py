"""The typed config loader: types, unknown keys, overrides, error messages with key paths."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from embedtune.config import Registry, apply_overrides, config_to_dict, load_config
from embedtune.errors import ConfigError


@dataclass
class Opt:
    """Test optimizer block."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    name: Literal["adamw", "sgd"] = "adamw"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")


@dataclass
class Root:
    """Test root config."""

    seed: int = 0
    tag: str | None = None
    dims: list[int] | None = None
    flag: bool = False
    optimizer: Opt = field(default_factory=Opt)
    extra: dict[str, float] = field(default_factory=dict)
    maybe: Opt | None = None


def test_defaults_and_nested_values():
    cfg = load_config(Root, {"seed": 3, "optimizer": {"lr": "1e-5", "betas": [0.8, 0.9]}, "dims": [4, 2]})
    assert cfg.seed == 3 and cfg.optimizer.lr == 1e-5 and cfg.optimizer.betas == (0.8, 0.9)
    assert cfg.dims == [4, 2] and cfg.maybe is None and cfg.flag is False


def test_yaml_file_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("seed: 1\noptimizer:\n  lr: 1e-4\n")
    cfg = load_config(Root, p, ["optimizer.lr=2e-5", "flag=true", "dims=[8,4]", "maybe.lr=0.5", "tag=null"])
    assert cfg.optimizer.lr == 2e-5 and cfg.flag is True and cfg.dims == [8, 4]
    assert cfg.maybe == Opt(lr=0.5)
    assert cfg.seed == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"optimizer": {"lr": "abc"}}, r"^optimizer\.lr: expected float, got 'abc'$"),
        (
            {"optimizer": {"lrr": 1}},
            r"^optimizer\.lrr: unknown key; allowed keys: betas, lr, name — did you mean 'lr'\?$",
        ),
        ({"optimizer": {"zzz": 1}}, r"^optimizer\.zzz: unknown key; allowed keys: betas, lr, name$"),
        ({"optimizer": {"name": "adam"}}, r"^optimizer\.name: 'adam' is not one of: adamw, sgd$"),
        ({"optimizer": {"lr": -1}}, r"^optimizer\.lr: must be > 0, got -1\.0$"),
        ({"seed": 1.5}, r"^seed: expected int, got 1\.5$"),
        ({"flag": "yes please"}, r"^flag: expected true or false"),
        ({"dims": [1, "x"]}, r"^dims\[1\]: expected int, got 'x'$"),
        ({"optimizer": {"betas": [0.9]}}, r"^optimizer\.betas: expected 2 values, got 1$"),
        ({"optimizer": 3}, r"^optimizer: expected a mapping"),
        ({"extra": {"a": "z"}}, r"^extra\.a: expected float"),
    ],
)
def test_errors_name_the_key_path(data, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Root, data)


def test_file_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optimizer:\n  lr: abc\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: optimizer\.lr: expected float"):
        load_config(Root, p)
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Root, p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Root, tmp_path / "missing.yaml")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match=r"expected KEY\.PATH=VALUE"):
        apply_overrides({}, ["optimizer.lr"])
    with pytest.raises(ConfigError, match="seed is a value, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_overrides_do_not_mutate_the_source():
    src = {"optimizer": {"lr": 1.0}}
    apply_overrides(src, ["optimizer.lr=2"])
    assert src == {"optimizer": {"lr": 1.0}}


def test_round_trip_through_dict():
    cfg = load_config(Root, {"optimizer": {"lr": 0.1}, "dims": [3], "maybe": {}})
    assert load_config(Root, config_to_dict(cfg)) == cfg


def test_registry_lists_names_in_errors():
    reg: Registry[object] = Registry("widget")
    reg.register("a")(object)
    reg.register("b")(object)
    with pytest.raises(ConfigError, match=r"^x\.name: unknown widget 'c'; choose one of: a, b$"):
        reg.get("c", "x.name")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(int)


@dataclass
class Item:
    """A list entry."""

    path: str = ""
    weight: float = 1.0


@dataclass
class WithList:
    """A config with a list of sections."""

    items: list[Item] = field(default_factory=list)


def test_overrides_index_lists():
    cfg = load_config(
        WithList, {"items": [{"path": "a"}, {"path": "b"}]}, ["items[1].weight=2", "items.0.path=z"]
    )
    assert cfg.items == [Item("z", 1.0), Item("b", 2.0)]
    with pytest.raises(ConfigError, match=r"items\[5\] does not exist"):
        load_config(WithList, {"items": [{"path": "a"}]}, ["items[5].path=x"])
    with pytest.raises(ConfigError, match="bad list index"):
        apply_overrides({"items": []}, ["items[x].path=1"])
    with pytest.raises(ConfigError, match=r"items\[0\]\.pth: unknown key; allowed keys: path, weight"):
        load_config(WithList, {"items": [{"path": "a"}]}, ["items[0].pth=x"])
