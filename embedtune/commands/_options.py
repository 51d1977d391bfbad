"""Command-line options shared by the commands that encode a corpus (``eval``, ``search``)."""

from __future__ import annotations

import argparse


def add_encoding_arguments(parser: argparse.ArgumentParser) -> None:
    """--batch-size, --max-length, --bf16, --backend, --runtime, --device, --cache-dir, --no-cache."""
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's)")
    parser.add_argument(
        "--bf16", action="store_true", help="encode under bfloat16 autocast (faster, ~1e-3 off)"
    )
    parser.add_argument("--backend", choices=("exact", "faiss"), default="exact", help="search back-end")
    parser.add_argument(
        "--runtime",
        choices=("torch", "onnx"),
        default=None,
        help="encoder runtime (default: onnx for a folder written by `embedtune export onnx`, else torch)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--cache-dir", default=None, help="corpus-embedding cache (default: embedtune's cache)"
    )
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
