"""``embedtune encode``: embed a file of texts into a ``.npy`` matrix (PyTorch or ONNX Runtime)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "embed texts from a .txt (one per line) or .jsonl file into a .npy matrix"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="bi-encoder folder/name, or an ONNX export with --backend onnx"
    )
    parser.add_argument("--input", required=True, help="texts: .txt (one per line) or .jsonl (see --field)")
    parser.add_argument("--output", required=True, help="where to write the (num_texts, dim) float32 .npy")
    parser.add_argument(
        "--kind",
        choices=["query", "document"],
        default="document",
        help="picks the prefix (default document)",
    )
    parser.add_argument(
        "--backend",
        "--runtime",
        dest="backend",
        choices=["torch", "onnx"],
        default=None,
        help="inference backend (default: onnx for a folder written by `embedtune export onnx`, else torch)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per text (default: model's)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (torch backend)")
    parser.add_argument(
        "--field",
        default=None,
        help="JSONL field holding the text (default: 'text' with 'title' prepended as BEIR does, else 'query')",
    )


def check(args: argparse.Namespace) -> None:
    """Input, output and model, before anything heavy is imported."""
    from embedtune.commands import _checks

    inp = _checks.existing_path(args.input, "--input", kind="file")
    if inp.suffix not in (".txt", ".jsonl"):
        raise _checks.UsageError(f"--input {inp}: use a .txt (one text per line) or .jsonl file")
    _checks.check_output_file(args.output, "--output", suffixes=(".npy",))
    _checks.check_positive(args.batch_size, "--batch-size")
    _checks.check_positive(args.max_length, "--max-length")
    _checks.check_model(args.model)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from embedtune._atomic import atomic_file
    from embedtune.export.runtime import load_encoder

    texts = read_texts(Path(args.input), args.field)
    output = Path(args.output)
    if output.suffix != ".npy":
        from embedtune.errors import ConfigError

        raise ConfigError(f"--output {output}: must end in .npy (numpy.save format)")
    backend = args.backend or "auto"
    encoder = load_encoder(args.model, backend)
    emb = encoder.encode(
        texts, args.kind, batch_size=args.batch_size, max_length=args.max_length, bf16=args.bf16
    )
    with atomic_file(output, "wb") as f:  # a failed write keeps the previous file
        np.save(f, np.asarray(emb, dtype=np.float32))
    print(f"wrote {output}: {len(texts)} x {emb.shape[1]} ({args.kind}, {type(encoder).__name__})")
    return 0


def read_texts(path: Path, field: str | None = None) -> list[str]:
    """Texts from a ``.txt`` file (one per line, blank lines kept out) or a ``.jsonl`` file.

    A JSONL line is a string, or an object whose ``field`` (default: ``title`` + ``text`` as BEIR
    joins them, else ``query``) holds the text.

    Raises:
        DataError: a missing file, an unknown extension, or a bad line (with its number).
    """
    import json

    from embedtune.errors import DataError

    if not path.is_file():
        raise DataError(f"--input {path}: no such file")
    if path.suffix not in (".txt", ".jsonl"):
        raise DataError(f"--input {path}: use a .txt (one text per line) or .jsonl file")
    texts: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.suffix == ".txt":
                texts.append(line)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            text = _text_of(obj, field)
            if text is None:
                wanted = repr(field) if field else "'text' or 'query'"
                raise DataError(f"{path}:{lineno}: no string field {wanted} — choose the field with --field")
            texts.append(text)
    if not texts:
        raise DataError(f"--input {path}: no texts in the file")
    return texts


def _text_of(obj: object, field: str | None) -> str | None:
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict):
        return None
    if field is not None:
        value = obj.get(field)
        return value if isinstance(value, str) else None
    if isinstance(obj.get("text"), str):
        title = obj.get("title")
        return (f"{title} {obj['text']}" if isinstance(title, str) and title else obj["text"]).strip()
    value = obj.get("query")
    return value if isinstance(value, str) else None
