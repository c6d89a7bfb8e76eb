"""CLI subcommand ``data``: how a text source is split into calibration and held-out evaluation text.

    python -m core data --source notes.jsonl --seq-len 64
"""
from __future__ import annotations

from core.data.text import SPLITS, describe_source, split_text_file, token_stream, window_body
from core.models.loading import load_tokenizer


def register(sub) -> None:
    """Add the ``data`` subcommand."""
    d = sub.add_parser("data", help="how a text source is split into calibration and evaluation text")
    d.add_argument("--source", default="wiki", help="wiki, news, or a .txt/.jsonl path")
    d.add_argument("--model", default="smollm2-135m", help="whose tokenizer counts the tokens and windows")
    d.add_argument("--seq-len", type=int, default=128, help="window length for the window counts")
    d.add_argument("--json", action="store_true", help="print one JSON line")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(handler=cmd_data)


def cmd_data(args) -> dict:
    """The split in words, and per part: documents (files), tokens and whole windows of ``--seq-len``."""
    out = {"source": args.source, "split": describe_source(args.source)}
    if args.source not in ("wiki", "news"):
        parts = split_text_file(args.source)
        out.update(how=parts.how, documents=parts.documents, calibration_documents=len(parts.calibration),
                   evaluation_documents=len(parts.evaluation))
    tokenizer = load_tokenizer(args.model)
    body = window_body(tokenizer, args.seq_len)[1]
    for split in SPLITS:
        tokens = len(token_stream(tokenizer, args.source, split))
        out[f"{split}_tokens"], out[f"{split}_windows"] = tokens, tokens // body
    return out
