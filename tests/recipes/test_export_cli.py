"""`embedtune export onnx` and `embedtune encode` end to end on a saved tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from embedtune import AutoBiEncoder
from embedtune.cli import main
from embedtune.export.errors import int8_unsupported_reason

needs_int8 = pytest.mark.skipif(int8_unsupported_reason() is not None, reason=str(int8_unsupported_reason()))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama saved as training saves it, with prefixes and last-token pooling."""
    path = tmp_path_factory.mktemp("cli") / "model"
    model = AutoBiEncoder.from_pretrained("tiny-llama", pooling="last", query_prefix="query: ")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exported(saved_model: Path) -> Path:
    out = saved_model.parent / "onnx"
    assert (
        main(["export", "onnx", "--model", str(saved_model), "--output", str(out), "--max-length", "64"]) == 0
    )
    return out


def test_export_writes_a_verified_self_describing_folder(exported: Path, capsys):
    files = {p.name for p in exported.iterdir()}
    assert {"model.onnx", "embedtune.json", "tokenizer.json", "tokenizer_config.json"} <= files
    settings = json.loads((exported / "embedtune.json").read_text())
    assert settings["pooling"] == "last" and settings["query_prefix"] == "query: "
    assert settings["max_length"] == 64 and settings["padding_side"] in ("left", "right")
    assert settings["source"]["onnx"]["verification"]["min_cosine"] >= 0.9999


@pytest.mark.parametrize("kind", ["query", "document"])
def test_encode_with_onnx_backend_equals_torch_backend(saved_model: Path, exported: Path, tmp_path, kind):
    texts = tmp_path / "texts.txt"
    texts.write_text("Vaccines\nhow do vaccines work?\n\nThe committee postponed its decision.\n")
    ref, got = tmp_path / "torch.npy", tmp_path / "onnx.npy"
    base = ["encode", "--input", str(texts), "--kind", kind, "--max-length", "64"]
    assert main([*base, "--model", str(saved_model), "--output", str(ref)]) == 0
    assert main([*base, "--model", str(exported), "--output", str(got), "--backend", "onnx"]) == 0
    a, b = np.load(ref), np.load(got)
    assert a.shape == (3, 64)  # blank line skipped
    np.testing.assert_allclose(b, a, atol=1e-4)


def test_encode_reads_jsonl_title_and_text(exported: Path, tmp_path):
    rows = [
        {"_id": "1", "title": "Vaccines", "text": "train immunity"},
        {"query": "a question"},
        "plain string",
    ]
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "emb.npy"
    assert (
        main(
            [
                "encode",
                "--model",
                str(exported),
                "--backend",
                "onnx",
                "--input",
                str(src),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    emb = np.load(out)
    from embedtune.export.runtime import OnnxBiEncoder

    ref = OnnxBiEncoder.from_pretrained(exported).encode(
        ["Vaccines train immunity", "a question", "plain string"]
    )
    np.testing.assert_allclose(emb, ref, atol=1e-6)


def test_cli_errors_are_one_line_with_the_fix(
    saved_model: Path, exported: Path, tmp_path, capsys, monkeypatch
):
    not_model = tmp_path / "not-a-model"
    not_model.mkdir()
    (not_model / "notes.txt").write_text("x")
    assert main(["export", "onnx", "--model", str(not_model), "--output", str(tmp_path / "o")]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert (
        main(
            ["export", "onnx", "--model", str(saved_model), "--output", str(tmp_path / "o2"), "--opset", "13"]
        )
        == 2
    )
    assert "--opset 13 is too old for an operator" in capsys.readouterr().err
    texts = tmp_path / "t.txt"
    texts.write_text("hello\n")
    out = tmp_path / "e.npy"
    assert (
        main(
            [
                "encode",
                "--model",
                str(exported),
                "--input",
                str(texts),
                "--output",
                str(out),
                "--backend",
                "torch",
            ]
        )
        == 2
    )
    assert "--backend onnx" in capsys.readouterr().err
    # without --backend an export folder is recognised and run with ONNX Runtime
    assert main(["encode", "--model", str(exported), "--input", str(texts), "--output", str(out)]) == 0
    assert "OnnxBiEncoder" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    assert (
        main(
            [
                "encode",
                "--model",
                str(exported),
                "--backend",
                "onnx",
                "--input",
                str(bad),
                "--output",
                str(tmp_path / "e.npy"),
            ]
        )
        == 2
    )
    assert "bad.jsonl:2" in capsys.readouterr().err

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a)
    )
    assert main(["export", "onnx", "--model", str(saved_model), "--output", str(tmp_path / "o3")]) == 2
    assert "pip install 'embedtune[onnx]'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_beir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("beir")
    docs = {
        f"d{i}": f"document {i} about {w}"
        for i, w in enumerate(["cats", "ships", "rain", "jazz", "bread"] * 3)
    }
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n" for k, v in docs.items())
    )
    queries = {"q0": "cats", "q1": "jazz music", "q2": "rain"}
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items())
    )
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td3\t1\nq2\td2\t1\nq2\td7\t1\n"
    )
    return root


def test_eval_and_search_run_an_onnx_export_like_the_torch_model(
    saved_model, exported, tiny_beir, tmp_path, capsys
):
    metrics = {}
    for name, model, extra in (
        ("torch", saved_model, []),
        ("onnx", exported, []),
        ("flag", exported, ["--runtime", "onnx"]),
    ):
        out = tmp_path / f"{name}.json"
        args = ["eval", "--model", str(model), "--data", str(tiny_beir), "--no-cache", "--max-length", "64"]
        assert main([*args, "--output", str(out), *extra]) == 0
        metrics[name] = json.loads(out.read_text())["metrics"]
    for key, value in metrics["torch"].items():
        assert metrics["onnx"][key] == pytest.approx(value, abs=1e-6)
        assert metrics["flag"][key] == pytest.approx(value, abs=1e-6)
    capsys.readouterr()
    hits = {}
    for name, model in (("torch", saved_model), ("onnx", exported)):
        assert (
            main(
                [
                    "search",
                    "jazz",
                    "--model",
                    str(model),
                    "--corpus",
                    str(tiny_beir),
                    "--no-cache",
                    "--json",
                    "-k",
                    "3",
                ]
            )
            == 0
        )
        hits[name] = [
            json.loads(line)["id"] for line in capsys.readouterr().out.splitlines() if line.startswith("{")
        ]
    assert hits["onnx"] == hits["torch"] and len(hits["torch"]) == 3


@needs_int8
def test_int8_export_reports_ndcg_on_the_bundled_data(tmp_path, capsys):
    from embedtune.export.verify import bundled_eval_data

    data = bundled_eval_data()
    if data is None:
        pytest.skip("no bundled data/scifact-mini/test in this checkout")
    out = tmp_path / "int8"
    args = ["export", "onnx", "--model", "tiny-bert", "--output", str(out), "--quantize", "int8"]
    assert main([*args, "--eval-queries", "5", "--eval-docs", "40"]) == 0
    printed = capsys.readouterr().out
    assert "verify int8" in printed and "NDCG@10 on scifact-mini/test[test, 5 queries" in printed
    ndcg = json.loads((out / "embedtune.json").read_text())["source"]["onnx"]["ndcg@10"]
    assert ndcg["delta"] == pytest.approx(ndcg["int8"] - ndcg["fp32"])
    assert f"change {ndcg['delta']:+.4f}" in printed
