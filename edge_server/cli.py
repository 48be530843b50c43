"""`edge-server [serve] [flags]`: flags and environment -> `Settings`, then serve."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from .settings import EXIT_CONFIG, Settings, load_settings

log = logging.getLogger("edge_server")



def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every flag defaults to None so the environment can fill it in."""
    parser = argparse.ArgumentParser(
        prog="edge-server",
        description="OpenAI-compatible chat server for GGUF Qwen models. Every flag also reads EDGE_<FLAG>.",
    )
    parser.add_argument("command", nargs="?", choices=["serve"], default="serve", help="what to do (default: serve)")
    flag = parser.add_argument
    flag("--model", help="GGUF path, file name in models/, or OWNER/REPO/FILE.gguf on Hugging Face")
    flag("--models-dir", help="where models are found and downloaded (default: models)")
    flag("--host", help="address to bind (default: 127.0.0.1, loopback only)")
    flag("--port", type=int, help="port (default: 8000)")
    flag("--n-ctx", type=int, help="tokens per request, prompt + completion (default: min(4096, model's training context))")
    flag("--n-gpu-layers", help="layers to offload: auto (all when the build can), or a number (default: auto)")
    flag("--flash-attn", choices=["auto", "on", "off"],
         help="flash attention: auto lets llama.cpp decide (on GPUs; on CPUs it speeds prompts, slows decoding ~1%%)")
    flag("--threads", type=int, help="CPU threads (default: all available cores)")
    flag("--parallel", type=int, help="requests decoded together; the KV cache holds this many --n-ctx sequences (default: 4)")
    flag("--max-queue", type=int, help="requests that may wait before 429 (default: 16)")
    flag("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* routes")
    flag("--model-alias", help="the model id /v1/models shows (default: the file name)")
    flag("--max-body-bytes", type=int, help="largest request body accepted (default: 10 MiB)")
    flag("--log-level", choices=["debug", "info", "warning", "error"], help="log verbosity (default: info)")
    return parser


def parse_settings(argv: Sequence[str] | None) -> Settings:
    """Settings from the command line over the environment; exits 2 with one line on bad values."""
    args = vars(build_parser().parse_args(argv))
    args.pop("command")
    try:
        return load_settings(args)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        name = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "settings"
        print(f"edge-server: invalid {name}: {first['msg']}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("gguf").setLevel(logging.WARNING)  # the demo model writer narrates every file
    from .server import serve

    return serve(settings)


if __name__ == "__main__":
    raise SystemExit(main())
