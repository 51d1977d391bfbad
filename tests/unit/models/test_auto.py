"""AutoBiEncoder routing, checkpoint formats, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from embedtune import AutoBiEncoder, BiEncoder
from embedtune.errors import BidirectionalityError, ConfigError, EmbedtuneError, ModelLoadError
from embedtune.models import zoo
from embedtune.models.bidirectional import attends_to_future
from embedtune.models.llama import LlamaBidirectionalModel
from embedtune.models.ministral3 import Ministral3BidirectionalModel

TEXTS = ["the cat sat on the mat", "bidirectional attention for embeddings", "a"]


@pytest.mark.parametrize(
    ("name", "backbone", "converted"),
    [
        ("tiny-llama", LlamaBidirectionalModel, True),
        ("tiny-ministral3", Ministral3BidirectionalModel, True),
        ("tiny-mistral", "MistralModel", True),
        ("tiny-qwen3", "Qwen3Model", True),
        ("tiny-bert", "BertModel", False),
    ],
)
def test_routing_by_model_type(name: str, backbone, converted: bool) -> None:
    model = AutoBiEncoder.from_pretrained(name)
    assert isinstance(model, BiEncoder)
    kind = backbone if isinstance(backbone, str) else backbone.__name__
    assert type(model.backbone).__name__ == kind
    assert model.settings.bidirectional is converted
    assert attends_to_future(model.backbone)
    emb = model.encode_documents(TEXTS)
    assert emb.shape == (3, model.dim)
    assert abs(float((emb**2).sum(1).mean()) - 1.0) < 1e-5  # L2-normalised by default


def test_bidirectional_false_keeps_a_decoder_causal() -> None:
    model = AutoBiEncoder.from_pretrained("tiny-llama", bidirectional=False, pooling="last")
    assert not attends_to_future(model.backbone)
    assert model.settings.bidirectional is False


def test_causal_lm_checkpoint_loads_as_the_bare_encoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=200,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    lm = LlamaForCausalLM(cfg)
    lm.save_pretrained(tmp_path)
    AutoBiEncoder.from_pretrained("tiny-llama").tokenizer.save_pretrained(tmp_path)
    model = AutoBiEncoder.from_pretrained(tmp_path)
    assert isinstance(model.backbone, LlamaBidirectionalModel)
    for key, value in lm.model.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value, rtol=0, atol=0)


def test_nemo_llama_bidirec_config_loads_without_remote_code(tmp_path: Path) -> None:
    src = AutoBiEncoder.from_pretrained("tiny-llama")
    src.base_model.save_pretrained(tmp_path)
    src.tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    # What NeMo AutoModel writes: its own model_type/architecture, auto_map to code we never run.
    config.update(
        model_type="llama_bidirec",
        architectures=["LlamaBidirectionalModel"],
        pooling="avg",
        temperature=0.02,
        auto_map={"AutoModel": "llama_bidirectional_model.LlamaBidirectionalModel"},
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = AutoBiEncoder.from_pretrained(tmp_path, trust_remote_code=False)
    assert isinstance(model.backbone, LlamaBidirectionalModel)
    assert model.settings.pooling == "mean"  # NeMo's "avg"
    torch.testing.assert_close(model.encode_documents(TEXTS), src.encode_documents(TEXTS), rtol=0, atol=1e-6)


def test_mistral3_checkpoint_gives_its_language_tower(tmp_path: Path) -> None:
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = AutoConfig.from_pretrained(zoo.resolve("tiny-ministral3")).to_dict()
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=16,
        image_size=32,
        patch_size=16,
    )
    cfg = Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=1)
    torch.manual_seed(0)
    vlm = Mistral3ForConditionalGeneration(cfg)
    vlm.save_pretrained(tmp_path)
    tiny = AutoBiEncoder.from_pretrained("tiny-ministral3")
    tiny.tokenizer.save_pretrained(tmp_path)
    model = AutoBiEncoder.from_pretrained(tmp_path)
    assert isinstance(model.backbone, Ministral3BidirectionalModel)
    tower = vlm.model.language_model.state_dict()
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, tower[key], rtol=0, atol=0)


def test_sentence_transformers_layout_gives_the_defaults() -> None:
    model = AutoBiEncoder.from_pretrained("minilm")
    assert model.settings.pooling == "mean"
    assert model.settings.normalize is True
    assert model.settings.max_length == 256


def test_explicit_arguments_override_saved_settings() -> None:
    model = AutoBiEncoder.from_pretrained("minilm", pooling="cls", query_prefix="query: ", max_length=64)
    assert (model.settings.pooling, model.settings.query_prefix, model.settings.max_length) == (
        "cls",
        "query: ",
        64,
    )


# ------------------------------------------------------------------------------------------ errors
def test_unknown_pooling_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="mean, cls, last, weighted_mean"):
        AutoBiEncoder.from_pretrained("tiny-bert", pooling="maxpool")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        AutoBiEncoder.from_pretrained(str(tmp_path / "nope"))


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a model folder"):
        AutoBiEncoder.from_pretrained(tmp_path)


def test_empty_and_wrong_text_input() -> None:
    model = AutoBiEncoder.from_pretrained("tiny-bert")
    with pytest.raises(EmbedtuneError, match="empty list"):
        model.encode_queries([])
    with pytest.raises(EmbedtuneError, match="not a single string"):
        model.encode_queries("one string")
    with pytest.raises(EmbedtuneError, match=r"texts\[1\] is int"):
        model.encode_queries(["ok", 3])


def test_a_conversion_that_silently_fails_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """If a model family ignores is_causal=False (the NeMo regression), loading must fail, not train causally."""
    import embedtune.models.auto as auto

    monkeypatch.setattr(auto, "make_bidirectional", lambda model: model)
    with pytest.raises(BidirectionalityError, match="still attends causally"):
        AutoBiEncoder.from_pretrained("tiny-qwen3")
    # asked to stay causal, the same model loads
    assert not attends_to_future(AutoBiEncoder.from_pretrained("tiny-qwen3", bidirectional=False).backbone)


def test_verification_runs_at_load_for_converted_llama(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate the conversion silently breaking (e.g. after a library upgrade): the load-time probe catches it."""
    import embedtune.models.llama as llama

    monkeypatch.setattr(llama, "make_bidirectional", lambda model: model)
    original = llama.LlamaBidirectionalConfig.__post_init__

    def keep_causal(self, **kwargs):
        original(self, **kwargs)
        self.is_causal = True

    monkeypatch.setattr(llama.LlamaBidirectionalConfig, "__post_init__", keep_causal)
    with pytest.raises(BidirectionalityError, match="attends causally"):
        AutoBiEncoder.from_pretrained("tiny-llama")
    # with verify=False the (broken) model loads: the check is what stands between the user and causal training
    assert not attends_to_future(AutoBiEncoder.from_pretrained("tiny-llama", verify=False).backbone)


def test_loaded_model_is_in_eval_mode() -> None:
    model = AutoBiEncoder.from_pretrained("tiny-bert")
    assert not model.training
    assert not any(m.training for m in model.modules())


def test_onnx_backend_loads_an_export(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from embedtune.export.onnx import export_onnx
    from embedtune.export.runtime import OnnxBiEncoder

    torch_model = AutoBiEncoder.from_pretrained("tiny-bert")
    export_onnx(torch_model, tmp_path / "onnx")
    with pytest.raises(ModelLoadError, match="backend='onnx'"):
        AutoBiEncoder.from_pretrained(tmp_path / "onnx")
    for backend in ("onnx", "auto"):
        onnx_model = AutoBiEncoder.from_pretrained(str(tmp_path / "onnx"), backend=backend)
        assert isinstance(onnx_model, OnnxBiEncoder)
        torch.testing.assert_close(
            torch.as_tensor(onnx_model.encode_documents(TEXTS)),
            torch.as_tensor(torch_model.encode_documents(TEXTS)),
            atol=1e-5,
            rtol=1e-4,
        )
    assert isinstance(AutoBiEncoder.from_pretrained("tiny-bert", backend="auto"), BiEncoder)
