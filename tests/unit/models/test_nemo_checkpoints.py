"""Bi-encoder checkpoints as NeMo AutoModel saves them load with no remote code and NeMo's settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from embedtune.models import zoo
from embedtune.models.auto import AutoBiEncoder
from embedtune.models.ministral3 import Ministral3BidirectionalModel

TEXTS = ["a short text", "a somewhat longer text about nothing in particular"]


def _nemo_style(folder: Path, src: str, **config: object) -> Path:
    shutil.copytree(zoo.resolve(src), folder)
    data = json.loads((folder / "config.json").read_text())
    data.update(config)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def test_nemo_ministral3_bidirectional_checkpoint_loads_without_remote_code(tmp_path: Path) -> None:
    # NeMo saves its bidirectional Ministral3 with is_causal false and an auto_map to code it ships.
    folder = _nemo_style(
        tmp_path / "m3",
        "tiny-ministral3",
        is_causal=False,
        auto_map={"AutoModel": "model.Ministral3BidirectionalModel"},
        architectures=["Ministral3BidirectionalModel"],
    )
    model = AutoBiEncoder.from_pretrained(folder, trust_remote_code=False)
    assert isinstance(model.backbone, Ministral3BidirectionalModel) and model.settings.bidirectional
    reference = AutoBiEncoder.from_pretrained("tiny-ministral3")
    torch.testing.assert_close(
        torch.as_tensor(model.encode_documents(TEXTS)), torch.as_tensor(reference.encode_documents(TEXTS))
    )


def test_sentence_transformers_metadata_nemo_writes_sets_the_settings(tmp_path: Path) -> None:
    folder = _nemo_style(tmp_path / "st", "tiny-llama", model_type="llama_bidirec", pooling="avg")
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                },
            ]
        )
    )
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 64, "pooling_mode_lasttoken": True, "include_prompt": True})
    )
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "query: ", "document": "passage: "}})
    )
    model = AutoBiEncoder.from_pretrained(folder)
    s = model.settings
    assert (s.pooling, s.normalize, s.query_prefix, s.passage_prefix) == (
        "last",
        True,
        "query: ",
        "passage: ",
    )


def test_nemo_weighted_avg_config_reads_as_mean(tmp_path: Path) -> None:
    folder = _nemo_style(tmp_path / "wa", "tiny-llama", model_type="llama_bidirec", pooling="weighted_avg")
    assert AutoBiEncoder.from_pretrained(folder).settings.pooling == "mean"
