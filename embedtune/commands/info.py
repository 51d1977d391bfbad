"""``embedtune info MODEL``: load a model and show how it embeds (and prove its attention)."""

from __future__ import annotations

import argparse

HELP = "load a model (path, hub id or short name) and show its embedding settings and attention check"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="a folder, a hub id, or a short name (see --list)")
    parser.add_argument("--list", action="store_true", help="list the short model names that work offline")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own code")


def check(args: argparse.Namespace) -> None:
    """The model name or folder, before anything heavy is imported."""
    from embedtune.commands import _checks

    if args.model and not args.list:
        _checks.check_model(args.model, "MODEL")


def run(args: argparse.Namespace) -> int:
    from embedtune import AutoBiEncoder
    from embedtune.models import zoo
    from embedtune.models.bidirectional import attends_to_future

    if args.list or not args.model:
        for name, entry in zoo.ZOO.items():
            print(f"{name:16s} {entry.description}")
        return 0
    model = AutoBiEncoder.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    s = model.settings
    n_params = sum(p.numel() for p in model.parameters())
    rows = [
        (
            "backbone",
            f"{type(model.backbone).__name__} ({s.source.get('model_type', '?')}, {n_params / 1e6:.1f}M params)",
        ),
        (
            "attention",
            "bidirectional (converted, verified)"
            if s.bidirectional
            else ("bidirectional (native)" if attends_to_future(model.backbone) else "causal"),
        ),
        ("pooling", s.pooling + ("" if s.pool_instruction else " (prefix tokens excluded)")),
        ("normalize", str(s.normalize)),
        ("dim", str(model.dim)),
        ("query prefix", repr(s.query_prefix)),
        ("passage prefix", repr(s.passage_prefix)),
        ("max length", str(s.max_length)),
        ("padding side", s.padding_side),
    ]
    for key, value in rows:
        print(f"{key:15s} {value}")
    return 0
