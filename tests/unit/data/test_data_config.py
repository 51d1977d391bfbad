"""DataConfig: built by the recipe loader from YAML dicts, every bad value named by its field."""

from __future__ import annotations

import pytest

from embedtune.config import load_config
from embedtune.data.config import DataConfig, DatasetConfig
from embedtune.errors import ConfigError


def test_loader_builds_nested_datasets() -> None:
    cfg = load_config(
        DataConfig,
        {
            "datasets": [{"path": "a.jsonl", "weight": 2}, {"path": "b", "format": "beir", "split": "dev"}],
            "n_passages": 3,
        },
    )
    assert isinstance(cfg.datasets[0], DatasetConfig) and cfg.datasets[0].weight == 2
    assert cfg.datasets[1].format == "beir" and cfg.datasets[1].split == "dev"
    assert cfg.n_passages == 3 and cfg.fill_negatives == "random" and cfg.on_bad_row == "error"


def test_code_may_pass_dicts_or_bare_paths() -> None:
    cfg = DataConfig(datasets=["a.jsonl", {"path": "b.json", "weight": 0.5}])
    assert [d.path for d in cfg.datasets] == ["a.jsonl", "b.json"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"datasets": []}, "datasets: give at least one"),
        ({"datasets": [{"path": ""}]}, "datasets[0].path: required"),
        ({"datasets": [{"path": "a", "weight": 0}]}, "datasets[0].weight: must be a number > 0"),
        ({"datasets": [{"path": "a"}], "n_passages": 0}, "n_passages: must be an integer >= 1"),
        ({"datasets": [{"path": "a"}], "q_max_len": 1}, "q_max_len: must be an integer >= 2"),
        (
            {"datasets": [{"path": "a"}], "pad_to_multiple_of": 0},
            "pad_to_multiple_of: must be an integer >= 1",
        ),
        (
            {"datasets": [{"path": "a"}], "p_max_len": 100},
            "p_max_len: 100 is not a multiple of pad_to_multiple_of (8) — use 104",
        ),
        ({"datasets": [{"path": "a"}], "samples_per_epoch": 0}, "samples_per_epoch: must be an integer >= 1"),
    ],
)
def test_post_init_names_the_field(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        DataConfig(**data)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"datasets": [{"path": "a"}], "fill_negatives": "cycle"}, "fill_negatives: 'cycle' is not one of"),
        ({"datasets": [{"path": "a"}], "on_bad_row": "ignore"}, "on_bad_row: 'ignore' is not one of"),
        ({"datasets": [{"path": "a", "format": "csv"}]}, "datasets"),
        ({"datasets": [{"path": "a", "wieght": 2}]}, "wieght: unknown key"),
        ({"datasets": [{"path": "a"}], "n_pasages": 2}, "n_pasages: unknown key"),
    ],
)
def test_loader_rejects_bad_values_with_their_path(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(DataConfig, data)
