"""Fixtures for the ONNX export tests: tiny random models, exported once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from embedtune import AutoBiEncoder
from embedtune.export.onnx import ExportResult, export_onnx


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Any, ExportResult]]:
    """``exports(name, **options) -> (torch BiEncoder, ExportResult)``, cached per argument set.

    The model options (pooling, prefixes, ...) go to ``AutoBiEncoder.from_pretrained``; ``dtype``,
    ``quantize``, ``external_data`` and ``opset`` go to the exporter.
    """
    cache: dict[tuple, tuple[Any, ExportResult]] = {}
    export_keys = ("dtype", "quantize", "external_data", "opset")

    def get(name: str, **options: Any) -> tuple[Any, ExportResult]:
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            export_kw = {k: options[k] for k in export_keys if k in options}
            model_kw = {k: v for k, v in options.items() if k not in export_keys}
            model = AutoBiEncoder.from_pretrained(name, **model_kw)
            out = Path(tmp_path_factory.mktemp("onnx")) / "export"
            cache[key] = (model, export_onnx(model, out, **export_kw))
        return cache[key]

    return get
