"""ONNX export: the graph computes the PyTorch embeddings, stays bidirectional, and fails clearly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from _export_helpers import TEXTS, needs_int8

from embedtune import AutoBiEncoder
from embedtune.errors import ModelLoadError
from embedtune.export.errors import MissingExtraError, OnnxExportError, VerificationError
from embedtune.export.onnx import EXTERNAL_DATA_FILE, export_onnx
from embedtune.export.runtime import OnnxBiEncoder, read_export_info


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def torch_embed(model, feats) -> np.ndarray:
    with torch.no_grad():
        return model(**feats).numpy()


def with_side(tokenizer, side: str):
    class _Side:
        def __enter__(self):
            self.old = tokenizer.padding_side
            tokenizer.padding_side = side

        def __exit__(self, *exc):
            tokenizer.padding_side = self.old

    return _Side()


# --------------------------------------------------------------------------------------------- parity
# Every test below reuses these exports (one per option set) to keep the suite fast.
LLAMA_MEAN = {"pooling": "mean", "query_prefix": "query: "}
LLAMA_LAST = {"pooling": "last", "query_prefix": "query: "}


@pytest.mark.parametrize(
    ("name", "pooling"),
    [("tiny-llama", "mean"), ("tiny-llama", "last"), ("tiny-ministral3", "last"), ("tiny-bert", "mean")],
)
def test_fp32_export_matches_pytorch_on_padded_batches_both_sides(exports, name, pooling):
    model, result = exports(name, pooling=pooling, query_prefix="query: ")
    assert result.parity is not None and result.parity.min_cosine >= 0.9999  # the export's own check
    assert result.parity.padding_sides == ("right", "left")
    onnx_model = OnnxBiEncoder.from_pretrained(result.folder)
    for side in ("right", "left"):
        with with_side(model.tokenizer, side):
            feats = model.tokenize(TEXTS, "query")
        assert (feats["attention_mask"] == 0).any()  # really padded
        ref = torch_embed(model, feats)
        got = onnx_model(**feats)
        assert cosines(ref, got).min() >= 0.9999
        assert np.abs(ref - got).max() < 1e-4


@pytest.mark.parametrize(
    "options", [LLAMA_LAST, {"pooling": "cls", "bidirectional": None}], ids=["last", "cls"]
)
def test_position_sensitive_pooling_gives_same_vector_for_either_padding_side(exports, options):
    _, result = exports("tiny-llama", **options)
    onnx_model = OnnxBiEncoder.from_pretrained(result.folder)
    alone = np.concatenate([onnx_model(**onnx_model.tokenize([t])) for t in TEXTS])  # no padding at all
    for side in ("right", "left"):
        onnx_model.tokenizer.padding_side = side
        batch = onnx_model(**onnx_model.tokenize(TEXTS))
        np.testing.assert_allclose(batch, alone, atol=2e-5)


def test_exported_decoder_attends_bidirectionally(exports):
    # cls pooling returns the first token's vector: only a bidirectional graph lets the last token
    # change it. The causal export of the same weights is the control that shows the probe can fail.
    changes = {}
    for bidirectional in (None, False):
        _, result = exports("tiny-llama", pooling="cls", bidirectional=bidirectional)
        onnx_model = OnnxBiEncoder.from_pretrained(result.folder)
        feats = {k: v.numpy() for k, v in onnx_model.tokenize(["the first token sees the last one"]).items()}
        bumped = {k: v.copy() for k, v in feats.items()}
        bumped["input_ids"][0, -1] = (bumped["input_ids"][0, -1] + 17) % 1000 + 10
        changes[bidirectional] = np.abs(onnx_model(**feats) - onnx_model(**bumped)).max()
    assert changes[None] > 1e-3
    assert changes[False] < 1e-6


@pytest.mark.parametrize("side", ["right", "left"])
def test_exported_graph_ignores_padding(exports, side):
    _, result = exports("tiny-llama", **LLAMA_MEAN)
    onnx_model = OnnxBiEncoder.from_pretrained(result.folder, padding_side=side)
    feats = {k: v.numpy() for k, v in onnx_model.tokenize(TEXTS).items()}
    base = onnx_model(**feats)
    pad = feats["attention_mask"] == 0
    assert pad.any()
    # 1. other token ids under the padded positions
    changed = dict(
        feats, input_ids=np.where(pad, (feats["input_ids"] * 7 + 123) % 5000 + 10, feats["input_ids"])
    )
    np.testing.assert_allclose(onnx_model(**changed), base, atol=1e-5)
    # 2. three more padded positions, holding random ids
    extra = np.random.default_rng(0).integers(10, 5000, (len(TEXTS), 3))
    zeros = np.zeros_like(extra)

    def grow(a, fill):
        return np.concatenate([a, fill], 1) if side == "right" else np.concatenate([fill, a], 1)

    longer = {
        "input_ids": grow(feats["input_ids"], extra),
        "attention_mask": grow(feats["attention_mask"], zeros),
        "pooling_mask": grow(feats["pooling_mask"], zeros),
    }
    np.testing.assert_allclose(onnx_model(**longer), base, atol=1e-5)


def test_instruction_tokens_are_excluded_through_the_pooling_mask_input(exports):
    model, result = exports(
        "tiny-llama",
        pooling="mean",
        query_prefix="Instruct: find the passage\nQuery: ",
        pool_instruction=False,
    )
    assert result.inputs == ("input_ids", "attention_mask", "pooling_mask")
    onnx_model = OnnxBiEncoder.from_pretrained(result.folder)
    for side in ("right", "left"):
        with with_side(model.tokenizer, side):
            feats = model.tokenize(TEXTS, "query")
        assert (feats["pooling_mask"] != feats["attention_mask"]).any()
        ref = torch_embed(model, feats)
        got = onnx_model(**feats)
        assert cosines(ref, got).min() >= 0.9999
        # The input is used: pooling the instruction tokens too gives other vectors.
        with_prompt = onnx_model(feats["input_ids"], feats["attention_mask"], feats["attention_mask"])
        assert np.abs(with_prompt - got).max() > 1e-3


def test_graph_without_instruction_exclusion_has_two_inputs(exports):
    _, result = exports("tiny-llama", **LLAMA_MEAN)
    graph = onnx.load(str(result.folder / "model.onnx"), load_external_data=False)
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.graph.output] == ["embeddings"]
    # batch and sequence axes are symbolic, not the trace's sizes
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input]
    assert all(isinstance(d, str) for row in dims for d in row)


# ------------------------------------------------------------------------------------------ precisions
def test_fp16_export_is_half_precision_inside_and_close_to_pytorch(exports):
    model, result = exports("tiny-llama", **LLAMA_MEAN, dtype="fp16")
    graph = onnx.load(str(result.folder / "model.onnx"))
    types = {t.data_type for t in graph.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types
    assert result.parity is not None and result.parity.min_cosine >= 0.999
    onnx_model = OnnxBiEncoder.from_pretrained(result.folder)
    feats = model.tokenize(TEXTS, "document")
    got = onnx_model(**feats)
    assert got.dtype == np.float32  # io stays float32
    assert cosines(torch_embed(model, feats), got).min() >= 0.999


@needs_int8
def test_int8_export_is_quantised_smaller_verified_and_reports_ndcg_change(exports, tmp_path):
    from embedtune.export.verify import SmallEvalSet, retrieval_ndcg

    docs = [f"document {i} about {w}" for i, w in enumerate(["cats", "ships", "rain", "jazz", "bread"] * 4)]
    eval_set = SmallEvalSet(
        name="toy",
        queries={"q0": "cats", "q1": "jazz music", "q2": "rain"},
        qrels={"q0": {"d0": 1}, "q1": {"d3": 1}, "q2": {"d2": 1, "d7": 1}},
        doc_ids=[f"d{i}" for i in range(len(docs))],
        doc_texts=docs,
    )
    model = AutoBiEncoder.from_pretrained("tiny-bert", query_prefix="query: ")
    result = export_onnx(model, tmp_path / "int8", quantize="int8", eval_set=eval_set)
    _, fp32 = exports("tiny-bert", pooling="mean", query_prefix="query: ")
    graph = onnx.load(str(result.folder / "model.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    weights = {t.name for t in graph.graph.initializer}
    assert "MatMulNBits" in ops
    # Every MatMul by a weight is int8 now; the MatMuls left multiply activations (attention scores).
    assert not [n.name for n in graph.graph.node if n.op_type == "MatMul" and set(n.input) & weights]
    assert {n.domain for n in graph.graph.node if n.op_type == "MatMulNBits"} == {"com.microsoft"}
    assert all(
        a.i == 8
        for n in graph.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "bits"
    )
    assert (result.folder / "model.onnx").stat().st_size < (fp32.folder / "model.onnx").stat().st_size
    # The fp32 graph is verified before quantising; int8 is then compared with PyTorch and reported.
    assert result.fp32_parity is not None and result.fp32_parity.min_cosine >= 0.9999
    assert result.parity is not None and result.parity.min_cosine < result.fp32_parity.min_cosine
    assert result.parity.min_cosine > 0.9  # quantisation noise, not a broken graph
    info = read_export_info(result.folder)
    assert info["quantize"] == "int8" and info["verification"]["min_cosine"] == result.parity.min_cosine
    # NDCG@10 of fp32 and int8 on the evaluation set, and their difference
    assert set(result.ndcg) == {"fp32", "int8", "delta"}
    assert result.ndcg["delta"] == pytest.approx(result.ndcg["int8"] - result.ndcg["fp32"])
    int8 = OnnxBiEncoder.from_pretrained(result.folder)
    assert result.ndcg["int8"] == pytest.approx(retrieval_ndcg(int8, eval_set))
    assert result.ndcg["fp32"] == pytest.approx(
        retrieval_ndcg(OnnxBiEncoder.from_pretrained(fp32.folder), eval_set)
    )
    assert result.ndcg_slice["documents"] == result.ndcg_slice["total_documents"] == len(docs)
    assert info["min_cosine_gate"] == 0.95 and result.parity.min_cosine >= 0.95


@needs_int8
def test_int8_below_the_gate_fails_writes_nothing_and_keeps_an_earlier_export(tmp_path):
    model = AutoBiEncoder.from_pretrained("tiny-bert", query_prefix="query: ")
    out = tmp_path / "int8"
    first = export_onnx(model, out, quantize="int8", min_cosine=0.0)  # any int8 model passes a gate of 0
    worst, mean = first.parity.min_cosine, first.parity.mean_cosine
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert worst < 1.0
    gate = round(worst + (1.0 - worst) / 2, 9)  # just above what this model reaches
    with pytest.raises(VerificationError) as err:
        export_onnx(model, out, quantize="int8", min_cosine=gate)
    text = str(err.value)
    assert f"< gate {gate}" in text and "worst cosine" in text and f"mean {mean:.6f}" in text
    assert "Nothing was written" in text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(VerificationError, match="worst cosine"):
        export_onnx(model, tmp_path / "new", quantize="int8", min_cosine=gate)
    assert not (tmp_path / "new").exists()


def test_external_data_export_gives_the_same_embeddings(exports):
    _, inline = exports("tiny-llama", **LLAMA_MEAN)
    _, external = exports("tiny-llama", **LLAMA_MEAN, external_data=True)
    files = sorted(p.name for p in external.folder.iterdir())
    assert EXTERNAL_DATA_FILE in files and "model.onnx" in files
    assert (external.folder / "model.onnx").stat().st_size < 1_000_000  # the weights live outside
    a, b = OnnxBiEncoder.from_pretrained(inline.folder), OnnxBiEncoder.from_pretrained(external.folder)
    np.testing.assert_array_equal(a.encode(TEXTS), b.encode(TEXTS))


# ----------------------------------------------------------------------------------------------- LoRA
def test_lora_checkpoint_is_merged_and_matches_the_unmerged_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = AutoBiEncoder.from_pretrained("tiny-llama")
    base_feats = model.tokenize(TEXTS, "document")
    base = torch_embed(model, base_feats)
    torch.manual_seed(0)
    # init_lora_weights=False: random A and B, so the adapter really changes the output
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
    )
    model.backbone = get_peft_model(model.backbone, lora)
    adapted = torch_embed(model, base_feats)
    assert cosines(base, adapted).min() < 0.999
    model.save_pretrained(tmp_path / "adapter", merge_lora=False)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    result = export_onnx(tmp_path / "adapter", tmp_path / "onnx")
    assert read_export_info(result.folder)  # exported and described
    onnx_model = OnnxBiEncoder.from_pretrained(result.folder)
    assert onnx_model.settings.source.get("lora_merged") is True
    assert cosines(adapted, onnx_model(**base_feats)).min() >= 0.9999


def test_a_loaded_lora_model_is_not_changed_by_exporting_it(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = AutoBiEncoder.from_pretrained("tiny-llama")
    model.backbone = get_peft_model(
        model.backbone, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    export_onnx(model, tmp_path / "onnx", verify=False)
    assert hasattr(model.backbone, "peft_config")  # still the PEFT model the caller trains


# --------------------------------------------------------------------------------------------- errors
def test_a_path_that_is_not_a_model_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a model folder"):
        export_onnx(tmp_path, tmp_path / "out")
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        export_onnx(tmp_path / "missing" / "model", tmp_path / "out2")
    assert not (tmp_path / "out").exists()


def test_an_opset_too_old_for_an_operator_names_the_fix(tmp_path):
    model = AutoBiEncoder.from_pretrained("tiny-llama")
    # scaled_dot_product_attention exports from opset 14 on
    with pytest.raises(OnnxExportError, match=r"--opset 13 is too old for an operator.*use --opset 17"):
        export_onnx(model, tmp_path / "out", opset=13)
    assert not (tmp_path / "out" / "model.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-export")]  # temp files cleaned
    with pytest.raises(OnnxExportError, match="too old"):
        export_onnx(model, tmp_path / "out", opset=5)
    with pytest.raises(OnnxExportError, match="exports opsets"):
        export_onnx(model, tmp_path / "out", opset=99)


def test_missing_onnx_extra_says_which_pip_install_to_run(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a)
    )
    with pytest.raises(MissingExtraError, match=r"onnx .*pip install 'embedtune\[onnx\]'"):
        export_onnx("tiny-llama", tmp_path / "out")


def test_failed_verification_writes_nothing(tmp_path):
    model = AutoBiEncoder.from_pretrained("tiny-llama")
    with pytest.raises(VerificationError, match="does not reproduce"):
        export_onnx(model, tmp_path / "out", min_cosine=1.5)  # an impossible threshold
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_bad_options_and_output_folders_are_refused(tmp_path, exports):
    model = AutoBiEncoder.from_pretrained("tiny-llama")
    with pytest.raises(OnnxExportError, match="--dtype"):
        export_onnx(model, tmp_path / "a", dtype="bf16")
    with pytest.raises(OnnxExportError, match="drop --dtype fp16"):
        export_onnx(model, tmp_path / "a", dtype="fp16", quantize="int8")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("...")
    with pytest.raises(OnnxExportError, match="not empty"):
        export_onnx(model, busy)
    _, result = exports("tiny-llama", **LLAMA_MEAN)
    with pytest.raises(OnnxExportError, match="already an ONNX export"):
        export_onnx(result.folder, tmp_path / "b")


def test_exporting_again_into_an_export_folder_replaces_it(tmp_path):
    model = AutoBiEncoder.from_pretrained("tiny-llama")
    export_onnx(model, tmp_path / "out", external_data=True, verify=False)
    assert (tmp_path / "out" / EXTERNAL_DATA_FILE).exists()
    export_onnx(model, tmp_path / "out", verify=False)
    assert not (tmp_path / "out" / EXTERNAL_DATA_FILE).exists()  # no stale weights left behind
    assert OnnxBiEncoder.from_pretrained(tmp_path / "out").encode(["x"]).shape == (1, model.dim)


@pytest.mark.parametrize("swap", ["renameat2", "rename-aside"])
def test_a_disk_failure_while_installing_a_new_export_keeps_the_previous_one(tmp_path, monkeypatch, swap):
    import errno
    import os
    import shutil

    import embedtune._atomic as atomic
    import embedtune.export.onnx as export_module

    model = AutoBiEncoder.from_pretrained("tiny-llama", pooling="mean")
    out = tmp_path / "out"
    export_onnx(model, out, external_data=True, verify=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    expected = OnnxBiEncoder.from_pretrained(out).encode(["a text"])

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_install = export_module._install

    def install_on_a_full_disk(src, output):
        # Every way of moving a file of the new export into place fails, from here on.
        real_rename, real_copy = os.rename, shutil.copyfile

        def rename(a, b, *rest, **kw):
            if "-export-" in str(a):
                full_disk()
            return real_rename(a, b, *rest, **kw)

        def copyfile(a, b, *rest, **kw):
            if "-export-" in str(a):
                full_disk()
            return real_copy(a, b, *rest, **kw)

        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(shutil, "copyfile", copyfile)
        if swap == "renameat2":
            monkeypatch.setattr(atomic, "_exchange", full_disk)
        else:
            monkeypatch.setattr(atomic, "_exchange", None)
        real_install(src, output)

    monkeypatch.setattr(export_module, "_install", install_on_a_full_disk)
    with pytest.raises(OSError, match="No space"):
        export_onnx(model, out, verify=False)  # would replace the external-data export by an inline one
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind
    np.testing.assert_array_equal(OnnxBiEncoder.from_pretrained(out).encode(["a text"]), expected)


def test_export_options_do_not_change_the_callers_model(tmp_path):
    model = AutoBiEncoder.from_pretrained("tiny-llama", pooling="mean")
    before = model.settings.max_length
    export_onnx(model, tmp_path / "out", max_length=16, verify=False)
    assert model.settings.max_length == before
    exported = OnnxBiEncoder.from_pretrained(tmp_path / "out")
    assert exported.settings.max_length == 16
    assert all(not m.training for m in model.backbone.modules())  # still in eval mode (no dropout)


def test_models_over_the_size_limit_get_external_data_automatically(tmp_path, monkeypatch):
    import embedtune.export.onnx as export_module

    model = AutoBiEncoder.from_pretrained("tiny-llama", pooling="mean")
    # tiny-llama is ~12 MiB: lower the 2 GB limit below it instead of building a 2 GB model
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_THRESHOLD", 1 << 20)
    result = export_onnx(model, tmp_path / "big")
    assert result.external_data and (tmp_path / "big" / EXTERNAL_DATA_FILE).is_file()
    assert result.parity is not None and result.parity.min_cosine >= 0.9999
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_THRESHOLD", 1 << 40)
    assert not export_onnx(model, tmp_path / "small", verify=False).external_data


def test_int8_with_an_onnxruntime_too_old_for_it_fails_before_any_work(tmp_path, monkeypatch, capsys):
    from importlib import metadata

    from embedtune.cli import main

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda p: "1.23.0" if p == "onnxruntime" else real(p))
    with pytest.raises(MissingExtraError, match=r"onnxruntime >= 1\.24 .*1\.23\.0 .*pip install -U"):
        export_onnx("tiny-bert", tmp_path / "a", quantize="int8")
    assert not (tmp_path / "a").exists()
    out = tmp_path / "b"
    assert main(["export", "onnx", "--model", "tiny-bert", "--output", str(out), "--quantize", "int8"]) != 0
    err = capsys.readouterr().err
    assert "onnxruntime >= 1.24" in err and "Traceback" not in err and not out.exists()
