"""Export a cross-encoder reranker to ONNX and verify the graph against PyTorch.

The graph is the sequence-classification forward (backbone → score head) with the ``(batch,)`` score
as output::

    input_ids       int64 (batch, sequence)
    attention_mask  int64 (batch, sequence)
    token_type_ids  int64 (batch, sequence)     only for models whose tokenizer makes them (BERT)
    scores          float32 (batch,)            the raw logit (apply a sigmoid for [0, 1] scores)

As for bi-encoders (``embedtune.export``), the trace input is a *padded* batch (an unpadded trace
lets transformers skip the attention mask and bakes that in), and verification does not stop at
shapes: the exported graph must reproduce PyTorch's scores on pairs of other lengths and batch sizes
(1, 3 and 8, padded and unpadded) within ``atol``, and order every batch's pairs identically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedtune.export.errors import VerificationError

__all__ = ["OnnxReranker", "export_reranker_onnx"]

_VERIFY_QUERIES = [
    "what causes tides",
    "is vitamin d linked to bone density in older adults",
    "q",
    "how do vaccines train the immune system to recognise a virus it has never met before",
]
_VERIFY_PASSAGES = [
    "The gravitational pull of the moon and the sun raises the oceans.",
    "Bone mineral density was measured in 1,200 adults over 65 years; vitamin D levels correlated weakly.",
    "x",
    "Vaccines expose the immune system to an antigen so that memory cells form. " * 6,
]


class _ScoreGraph(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.backbone = backbone
        self.names = names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.backbone(**dict(zip(self.names, inputs)))
        return out.logits.float().squeeze(-1)  # (batch,)


class OnnxReranker:
    """Score pairs with an exported reranker folder through ONNX Runtime (same tokenisation).

    Args:
        folder: the export folder (``model.onnx``, tokenizer, ``embedtune_reranker.json``).
    """

    def __init__(self, folder: str | Path) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        from embedtune.reranker.model import SETTINGS_FILE, RerankerSettings

        self.folder = Path(folder)
        raw = json.loads((self.folder / SETTINGS_FILE).read_text(encoding="utf-8"))
        raw.pop("format_version", None)
        self.settings = RerankerSettings(**raw)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        self.session = ort.InferenceSession(
            str(self.folder / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]

    def predict(self, queries: list[str], passages: list[str]) -> np.ndarray:
        """Raw scores, shape (len(queries),)."""
        if self.settings.template is None:
            feats = self.tokenizer(
                queries,
                passages,
                padding=True,
                truncation=True,
                max_length=self.settings.max_length,
                return_tensors="np",
            )
        else:
            texts = [self.settings.template.format(query=q, passage=p) for q, p in zip(queries, passages)]
            feats = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.settings.max_length, return_tensors="np"
            )
        return self.session.run(None, {n: feats[n].astype(np.int64) for n in self.input_names})[0]


def export_reranker_onnx(
    model: Any, output: str | Path, *, opset: int = 17, atol: float = 1e-4
) -> dict[str, Any]:
    """Export ``model`` (a ``CrossEncoderReranker`` or a folder) to ``output/model.onnx`` and verify it.

    Args:
        model: the reranker, or a path/short name to load.
        output: the export folder (created; holds the graph, tokenizer and settings).
        opset: ONNX opset.
        atol: largest allowed absolute difference between ONNX Runtime's and PyTorch's scores.

    Returns:
        A report: path, inputs, max abs difference, cases checked.

    Raises:
        VerificationError: (an ``EmbedtuneError``) the graph disagrees with PyTorch beyond ``atol`` or orders pairs differently.
    """
    from embedtune.reranker.model import SETTINGS_FILE, CrossEncoderReranker

    if not isinstance(model, CrossEncoderReranker):
        model = CrossEncoderReranker.from_pretrained(model)
    model = model.to("cpu").eval()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    # A padded trace batch: the attention mask must be part of the graph.
    trace = model.tokenize(_VERIFY_QUERIES[:2], _VERIFY_PASSAGES[:2])
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in trace]
    graph = _ScoreGraph(model.backbone, names).eval()
    dynamic = {n: {0: "batch", 1: "sequence"} for n in names} | {"scores": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(
            graph,
            tuple(trace[n] for n in names),
            str(out / "model.onnx"),
            input_names=names,
            output_names=["scores"],
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )
    model.tokenizer.save_pretrained(str(out))
    model.save_pretrained(out / "_torch")  # settings + config, for OnnxReranker and audits
    shutil.copy(out / "_torch" / SETTINGS_FILE, out / SETTINGS_FILE)
    shutil.copy(out / "_torch" / "config.json", out / "config.json")
    shutil.rmtree(out / "_torch")

    onnx_model = OnnxReranker(out)
    worst, cases = 0.0, 0
    for size in (1, 3, 8):
        qs = [_VERIFY_QUERIES[(i * 3) % 4] for i in range(size)]
        ps = [_VERIFY_PASSAGES[(i * 5 + 1) % 4] for i in range(size)]
        ref = model.predict(qs, ps, batch_size=size)
        got = onnx_model.predict(qs, ps)
        diff = float(np.max(np.abs(ref - got)))
        worst = max(worst, diff)
        cases += 1
        if diff > atol:
            raise VerificationError(
                f"{out}/model.onnx: scores differ from PyTorch by {diff:.2e} (> atol {atol:g}) at batch size {size} — "
                "the export is wrong; do not ship it (try another opset, or report the model type)"
            )
        if (
            size > 1
            and len(set(np.round(ref, 4))) == size
            and not np.array_equal(np.argsort(-ref), np.argsort(-got))
        ):
            raise VerificationError(
                f"{out}/model.onnx: orders pairs differently from PyTorch at batch size {size}"
            )
    report = {
        "path": str(out / "model.onnx"),
        "inputs": names,
        "max_abs_diff": worst,
        "cases": cases,
        "atol": atol,
        "opset": opset,
    }
    (out / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
