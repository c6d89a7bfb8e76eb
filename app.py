"""HFPrune Studio dashboard: ``python app.py`` → http://127.0.0.1:7860 (no public link unless --share).

Host and port come from --host/--port, else GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else
127.0.0.1:7860. This file only builds and launches; everything else lives in hfprune_ui and core.
"""
from __future__ import annotations

import argparse
import os

from core.progress import quiet_third_party
from hfprune_ui import build_demo, launch_options, queue
from hfprune_ui.services import Services

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _port(text: str) -> int:
    """A TCP port number, or an argparse error naming what was wrong."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be a number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {port}")
    return port


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="HFPrune Studio dashboard")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                        help="interface to bind (default 127.0.0.1, or $GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=_port, default=os.environ.get("GRADIO_SERVER_PORT") or "7860",
                        help="port (default 7860, or $GRADIO_SERVER_PORT)")
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    parser.add_argument("--export-root", default=os.environ.get("HFPRUNE_EXPORT_ROOT"),
                        help="'save to folder' writes only inside this folder (default: anywhere when bound to "
                             "127.0.0.1/localhost; ./exports when reachable from other machines or shared)")
    args = parser.parse_args(argv)
    if args.export_root is None and (args.share or args.host not in ("127.0.0.1", "localhost", "::1")):
        args.export_root = os.path.abspath("exports")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_third_party(progress_bars=False)  # the server's log holds no progress bars: the page shows them
    if args.export_root:
        print(f"Exports saved to a folder stay inside {args.export_root}")
    demo = queue(build_demo(Services(export_root=args.export_root)))
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_options())


if __name__ == "__main__":
    main()
