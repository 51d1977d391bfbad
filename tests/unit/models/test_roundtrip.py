"""Save, then reload three ways — AutoBiEncoder, plain transformers + the saved pooling, and
sentence-transformers — and get the same embeddings; MiniLM equals sentence-transformers itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from transformers import AutoModel

from embedtune import AutoBiEncoder, BiEncoder
from embedtune.models import zoo
from embedtune.models.pooling import pool

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "Vitamin D deficiency is associated with an increased risk of fractures in older adults.",
    "Transformers use self-attention to relate every token of a sequence to every other token.",
    "The mitochondria is the powerhouse of the cell.",
    "How do vaccines train the immune system?",
    "Coffee consumption was not associated with mortality in a large prospective cohort.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "Gradient checkpointing trades compute for memory.",
    "Short.",
    "An unusually long sentence that goes on and on, listing clause after clause, so that the batch it "
    "lands in needs padding for every other, shorter sentence beside it, which is the point of it.",
    "Proteins fold into three-dimensional structures determined by their amino-acid sequence.",
    "Climate models project warming under all emission scenarios.",
    "The stock market fell sharply on Monday.",
    "Quantum entanglement links the states of two particles.",
    "She sells sea shells by the sea shore.",
    "Large language models can be converted into text encoders.",
    "Hard negatives make contrastive training harder and more useful.",
    "Aspirin reduces the risk of heart attack in some patients.",
    "The Eiffel Tower was completed in 1889.",
    "Penguins live mostly in the Southern Hemisphere.",
    "Retrieval metrics include NDCG, recall and MRR.",
]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return F.cosine_similarity(a, b, dim=-1).numpy()


def plain_transformers_embeddings(folder: Path, texts: list[str], kind: str) -> np.ndarray:
    """Embed with stock transformers and the pooling written in embedtune.json — no embedtune model code."""
    settings = json.loads((folder / "embedtune.json").read_text())
    model = AutoModel.from_pretrained(folder).eval()  # is_causal: false in config.json does the rest
    tok = zoo_tokenizer(folder)
    tok.padding_side = settings["padding_side"]
    prefix = settings["query_prefix"] if kind == "query" else settings["passage_prefix"]
    enc = tok(
        [prefix + t for t in texts],
        padding=True,
        truncation=True,
        max_length=settings["max_length"],
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    pooling_mask = enc["attention_mask"].clone()
    if prefix and not settings["pool_instruction"]:  # right padding here: the prefix is at the start
        n_prefix = len(tok(prefix)["input_ids"]) - 1  # without the trailing [SEP]/EOS
        pooling_mask[:, :n_prefix] = 0
    out = pool(hidden, enc["attention_mask"], settings["pooling"], pooling_mask)
    return (F.normalize(out, dim=-1) if settings["normalize"] else out).numpy()


def zoo_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def check_roundtrip(model: BiEncoder, folder: Path, texts: list[str]) -> None:
    model.save_pretrained(folder)
    for kind in ("query", "document"):
        original = model.encode(texts, kind, batch_size=8)
        reloaded = AutoBiEncoder.from_pretrained(folder).encode(texts, kind, batch_size=8)
        assert cosines(original, reloaded).min() >= 0.9999
        plain = plain_transformers_embeddings(folder, texts, kind)
        assert cosines(original, plain).min() >= 0.9999
        st = SentenceTransformer(str(folder), device="cpu")
        st_emb = st.encode(texts, prompt_name=kind, batch_size=8, convert_to_numpy=True)
        assert cosines(original, st_emb).min() >= 0.9999
    config = json.loads((folder / "config.json").read_text())
    assert "_bidirec" not in config["model_type"]
    if model.settings.bidirectional:
        assert config["is_causal"] is False


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("tiny-llama", dict(query_prefix="query: ", passage_prefix="passage: ")),
        ("tiny-llama", dict(pooling="last", padding_side="left")),
        ("tiny-ministral3", dict(pooling="weighted_mean", padding_side="left", query_prefix="Q: ")),
        ("tiny-qwen3", dict(pooling="mean")),
        ("tiny-bert", dict(pooling="cls", normalize=False)),
    ],
)
def test_roundtrip_tiny(name: str, options: dict, tmp_path: Path) -> None:
    check_roundtrip(AutoBiEncoder.from_pretrained(name, **options), tmp_path / "m", SENTENCES[:12])


def test_roundtrip_with_instruction_excluded(tmp_path: Path) -> None:
    """include_prompt=false in the sentence-transformers config pools the same tokens as we do (WordPiece)."""
    model = AutoBiEncoder.from_pretrained(
        "tiny-bert", query_prefix="Represent this query: ", pool_instruction=False
    )
    check_roundtrip(model, tmp_path / "m", SENTENCES[:12])
    pooling = json.loads((tmp_path / "m" / "1_Pooling" / "config.json").read_text())
    assert pooling["include_prompt"] is False


def test_minilm_equals_sentence_transformers() -> None:
    ours = AutoBiEncoder.from_pretrained("minilm").encode_documents(SENTENCES, batch_size=7)
    theirs = SentenceTransformer(str(zoo.minilm_path()), device="cpu").encode(SENTENCES, batch_size=7)
    assert np.abs(ours - theirs).max() < 1e-5


def test_roundtrip_minilm(tmp_path: Path) -> None:
    check_roundtrip(
        AutoBiEncoder.from_pretrained("minilm", query_prefix="query: "), tmp_path / "m", SENTENCES
    )


def test_roundtrip_smollm2(tmp_path: Path) -> None:
    model = AutoBiEncoder.from_pretrained("smollm2-135m", query_prefix="query: ", passage_prefix="passage: ")
    assert model.settings.bidirectional
    check_roundtrip(model, tmp_path / "m", SENTENCES[:16])


def test_lora_merged_save_equals_adapter(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = AutoBiEncoder.from_pretrained("tiny-llama")
    model.backbone = get_peft_model(
        model.backbone, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    with torch.no_grad():  # LoRA B starts at zero: give it weights so the merge matters
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    with_adapter = model.encode_documents(SENTENCES[:10])
    base_only = AutoBiEncoder.from_pretrained("tiny-llama").encode_documents(SENTENCES[:10])
    assert cosines(with_adapter, base_only).min() < 0.999  # the adapter changes the embeddings
    model.save_pretrained(tmp_path / "merged")
    merged = AutoBiEncoder.from_pretrained(tmp_path / "merged").encode_documents(SENTENCES[:10])
    np.testing.assert_allclose(merged, with_adapter, atol=1e-5)
    model.save_pretrained(tmp_path / "adapter", merge_lora=False)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    adapter = AutoBiEncoder.from_pretrained(tmp_path / "adapter").encode_documents(SENTENCES[:10])
    np.testing.assert_allclose(adapter, with_adapter, atol=1e-6)
    # the live model keeps training: saving merged did not change it
    np.testing.assert_allclose(model.encode_documents(SENTENCES[:10]), with_adapter, atol=0)


def test_encode_preserves_order_and_batching_does_not_matter() -> None:
    model = AutoBiEncoder.from_pretrained("tiny-llama")
    one_by_one = np.stack([model.encode_documents([s])[0] for s in SENTENCES[:9]])
    batched = model.encode_documents(SENTENCES[:9], batch_size=4)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    as_tensor = model.encode_documents(SENTENCES[:3], convert_to_numpy=False)
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.shape == (3, model.dim)


def test_bf16_encoding_is_close_to_fp32() -> None:
    model = AutoBiEncoder.from_pretrained("minilm")
    fp32 = model.encode_documents(SENTENCES[:8])
    bf16 = model.encode_documents(SENTENCES[:8], bf16=True)
    assert cosines(fp32, bf16).min() > 0.99


def test_a_failed_save_keeps_the_previous_model_and_a_foreign_folder_is_never_replaced(tmp_path, monkeypatch):
    import embedtune._atomic as atomic
    from embedtune.errors import ConfigError

    folder = tmp_path / "model"
    AutoBiEncoder.from_pretrained("tiny-llama", pooling="mean").save_pretrained(folder)
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    expected = AutoBiEncoder.from_pretrained(folder).encode_documents(SENTENCES[:4])

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # The disk fills while the new version is swapped in (both ways of swapping).
    other = AutoBiEncoder.from_pretrained("tiny-llama", pooling="last")
    for exchange in (full_disk, None):
        monkeypatch.setattr(atomic, "_exchange", exchange)
        monkeypatch.setattr(
            atomic,
            "_rename",
            lambda a, b, real=atomic._rename: full_disk() if ".new-" in str(a) else real(a, b),
        )
        with pytest.raises(OSError, match="No space"):
            other.save_pretrained(folder)
        monkeypatch.undo()
        assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
        assert [p.name for p in tmp_path.iterdir()] == ["model"]
    np.testing.assert_array_equal(
        AutoBiEncoder.from_pretrained(folder).encode_documents(SENTENCES[:4]), expected
    )
    # A second save replaces the first completely.
    other.save_pretrained(folder)
    assert json.loads((folder / "embedtune.json").read_text())["pooling"] == "last"
    # A folder with someone's files in it is not a model folder: refused, untouched.
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("...")
    with pytest.raises(ConfigError, match="not an earlier saved model"):
        other.save_pretrained(busy)
    assert [p.name for p in busy.iterdir()] == ["thesis.tex"]


def _readers_reproduce_embedtune(
    folder: Path, texts: list[str], atol: float, onnx_atol: float | None = None
) -> None:
    """sentence-transformers, plain transformers and (when installed) ONNX equal embedtune's encoding."""
    ours = AutoBiEncoder.from_pretrained(folder)
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    st = SentenceTransformer(str(folder), device="cpu")
    for kind in ("query", "document"):
        expected = ours.encode(texts, kind, batch_size=8)
        got = st.encode(texts, prompt_name=kind, batch_size=8, convert_to_numpy=True)
        np.testing.assert_allclose(got, expected, atol=atol, err_msg=f"sentence-transformers, {kind}")
        plain = plain_transformers_embeddings(folder, texts, kind)
        np.testing.assert_allclose(plain, expected, atol=atol, err_msg=f"transformers, {kind}")
    try:
        from embedtune.export.onnx import export_onnx
        from embedtune.export.runtime import OnnxBiEncoder

        export_onnx(folder, folder.parent / f"{folder.name}-onnx")
    except ImportError:
        return
    onnx_model = OnnxBiEncoder.from_pretrained(folder.parent / f"{folder.name}-onnx")
    for kind in ("query", "document"):
        np.testing.assert_allclose(
            onnx_model.encode(texts, kind, batch_size=8),
            ours.encode(texts, kind, batch_size=8),
            atol=atol if onnx_atol is None else onnx_atol,
            err_msg=f"onnx, {kind}",
        )


def test_a_model_held_in_bf16_is_saved_in_fp32_and_every_reader_reproduces_embedtune(tmp_path):
    from safetensors import safe_open

    model = AutoBiEncoder.from_pretrained("tiny-llama", dtype="bfloat16", query_prefix="query: ")
    folder = model.save_pretrained(tmp_path / "m")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # noqa: SIM118
    _readers_reproduce_embedtune(folder, SENTENCES[:12], atol=1e-5)
    # The fp32 file holds the bf16 weights exactly: nothing was lost or changed by widening.
    reloaded = AutoBiEncoder.from_pretrained(folder)
    for (name, a), (_, b) in zip(
        model.base_model.state_dict().items(), reloaded.base_model.state_dict().items()
    ):
        torch.testing.assert_close(a.float(), b, atol=0, rtol=0, msg=name)
    # bf16 is opt-in.
    half = model.save_pretrained(tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(half / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm", "smollm2-135m"])
def test_saved_real_models_are_reproduced_by_every_reader_to_1e5(tmp_path, name):
    kw = dict(query_prefix="query: ", passage_prefix="passage: ") if name != "minilm" else {}
    folder = AutoBiEncoder.from_pretrained(name, **kw).save_pretrained(tmp_path / "m")
    # ONNX Runtime's fused fp32 kernels sum in another order than torch: over SmolLM2's 30 layers that
    # drifts up to 3.9e-5 on the unit-length embeddings (measured; 4 of 6,912 elements above 1e-5), so
    # ONNX is held to 1e-4 there. sentence-transformers and transformers run torch's kernels: 1e-5.
    _readers_reproduce_embedtune(
        folder, SENTENCES[:12], atol=1e-5, onnx_atol=1e-4 if name != "minilm" else None
    )


def test_the_model_card_names_the_hub_base_model_the_training_run_and_its_metrics(tmp_path):
    import yaml

    from embedtune.models.saving import base_model_id

    assert base_model_id("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert base_model_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("org/model") == "org/model" and base_model_id("tiny-llama") is None

    run = tmp_path / "run"
    run.mkdir()
    recipe = {
        "model": {"name_or_path": "smollm2-135m"},
        "data": {"datasets": [{"path": "data/train.json"}], "n_passages": 2},
        "loss": {"temperature": 0.05, "in_batch_negatives": True},
        "optimizer": {"lr": 2e-5},
        "lr_scheduler": {"name": "linear", "warmup_steps": 5},
        "step_scheduler": {"global_batch_size": 32, "max_steps": 30},
        "validation": {"data": "data/test", "metric": "ndcg@10"},
    }
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    records = [
        {"step": 0, "val/ndcg@10": 0.41, "val/recall@10": 0.5},
        {"step": 1, "loss": 2.5, "lr": 1e-5},
        {"step": 30, "loss": 0.7, "lr": 0.0},
        {"step": 30, "val/ndcg@10": 0.62, "val/recall@10": 0.7},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    model = AutoBiEncoder.from_pretrained("tiny-llama", pooling="last", query_prefix="query: ")
    model.settings.source["name_or_path"] = "smollm2-135m"  # as if converted from the real model
    card = (model.save_pretrained(run / "model") / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert (
        "`data/train.json`" in card
        and "| optimizer lr | 2e-05 |" in card
        and "| global batch size | 32 |" in card
    )
    assert "| ndcg@10 | 0.4100 | 0.6200 | 0.6200 (30) |" in card
    assert "loss 2.5000 → 0.7000" in card
    assert (
        'SentenceTransformer("model")' in card and "cumsum(1).argmax(1)" in card
    )  # last-token pooling snippet
    # The adapter's card says what it is and does not offer loaders that cannot read it.
    from peft import LoraConfig, get_peft_model

    model.backbone = get_peft_model(model.backbone, LoraConfig(r=2, target_modules="all-linear"))
    adapter_card = (model.save_pretrained(run / "adapter", merge_lora=False) / "README.md").read_text()
    assert "library_name: peft" in adapter_card and "SentenceTransformer(" not in adapter_card
    assert (
        "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in adapter_card
        and "`data/train.json`" in adapter_card
    )
