"""OnnxBiEncoder is a drop-in for BiEncoder at inference, and load_encoder picks the backend."""

from __future__ import annotations

import numpy as np
import pytest
from _export_helpers import TEXTS

from embedtune.errors import EmbedtuneError, ModelLoadError
from embedtune.export.runtime import OnnxBiEncoder, load_encoder

LLAMA_MEAN = {"pooling": "mean", "query_prefix": "query: "}


def test_encode_matches_biencoder_encode_for_queries_and_documents(exports):
    model, result = exports("tiny-llama", **LLAMA_MEAN)
    onnx_model = load_encoder(result.folder, "onnx")
    assert isinstance(onnx_model, OnnxBiEncoder)
    assert onnx_model.dim == model.dim
    texts = TEXTS * 3  # several length-sorted batches, order must come back
    for kind in ("query", "document"):
        ref = model.encode(texts, kind, batch_size=4)
        got = onnx_model.encode(texts, kind, batch_size=4)
        assert got.shape == ref.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=1e-4)
    # the prefix is applied: queries and documents differ for the same text
    assert np.abs(onnx_model.encode_queries(TEXTS) - onnx_model.encode_documents(TEXTS)).max() > 1e-3
    # per-call options behave as in BiEncoder
    np.testing.assert_allclose(
        onnx_model.encode(TEXTS, max_length=4, prefix="x: "),
        model.encode(TEXTS, max_length=4, prefix="x: "),
        atol=1e-4,
    )
    assert onnx_model.encode(TEXTS, convert_to_numpy=False).shape == (len(TEXTS), model.dim)


def test_encode_rejects_bad_input_like_biencoder(exports):
    _, result = exports("tiny-llama", **LLAMA_MEAN)
    onnx_model = OnnxBiEncoder.from_pretrained(result.folder)
    with pytest.raises(EmbedtuneError, match="not a single string"):
        onnx_model.encode("one text")
    with pytest.raises(EmbedtuneError, match="empty list"):
        onnx_model.encode([])
    with pytest.raises(EmbedtuneError, match="batch_size"):
        onnx_model.encode(["a"], batch_size=0)


def test_load_encoder_points_to_the_right_backend(exports, tmp_path):
    model, result = exports("tiny-llama", **LLAMA_MEAN)
    with pytest.raises(ModelLoadError, match="backend='onnx'"):
        load_encoder(result.folder, "torch")
    model.save_pretrained(tmp_path / "torch-model")
    with pytest.raises(ModelLoadError, match=r"not an ONNX export.*--backend torch"):
        load_encoder(tmp_path / "torch-model", "onnx")
    with pytest.raises(EmbedtuneError, match="unknown 'tf'"):
        load_encoder(result.folder, "tf")
    torch_model = load_encoder(tmp_path / "torch-model", "torch")
    np.testing.assert_allclose(
        load_encoder(result.folder, "onnx").encode(TEXTS), torch_model.encode(TEXTS), atol=1e-4
    )


def test_fingerprint_identifies_the_export(exports):
    _, a = exports("tiny-llama", **LLAMA_MEAN)
    _, b = exports("tiny-llama", pooling="last", query_prefix="query: ")
    fa = OnnxBiEncoder.from_pretrained(a.folder).fingerprint()
    assert fa == OnnxBiEncoder.from_pretrained(a.folder).fingerprint()
    assert fa != OnnxBiEncoder.from_pretrained(b.folder).fingerprint()
