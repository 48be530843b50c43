"""`edge-server [serve] [flags]` (flags and environment -> `Settings`, then serve), `pull`, `models`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from edge_server.memory import return_large_buffers_to_the_system
from edge_server.settings import EXIT_CONFIG, Settings, load_settings

log = logging.getLogger("edge_server")

def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every flag defaults to None so the environment can fill it in."""
    parser = argparse.ArgumentParser(
        prog="edge-server",
        description="OpenAI-compatible chat server for GGUF Qwen models. Every flag also reads EDGE_<FLAG>.",
    )
    parser.add_argument("command", nargs="?", choices=["serve"], default="serve",
                        help="serve (default); also: 'edge-server pull [REPO/FILE]', 'edge-server models', "
                             "'edge-server worker' (lends this machine's devices to a server's --rpc)")
    flag = parser.add_argument
    flag("--model", action="append", help="GGUF path, file name in models/, or OWNER/REPO/FILE.gguf on Hugging Face; "
                                           "repeat to serve several (the first is the default)")
    flag("--models-dir", help="where models are found and downloaded (default: models)")
    flag("--host", help="address to bind (default: 127.0.0.1, loopback only)")
    flag("--port", type=int, help="port (default: 8000)")
    flag("--n-ctx", type=int, help="tokens per request, prompt + completion (default: the model's training context, "
                                   "as far as half the free memory holds its KV cache for --parallel requests; at "
                                   "least min(4096, trained))")
    flag("--n-gpu-layers", help="layers to offload: auto (all when the build can), or a number (default: auto)")
    flag("--flash-attn", choices=["auto", "on", "off"],
         help="flash attention: auto lets llama.cpp decide (on GPUs; on CPUs it speeds prompts, slows decoding ~1%%)")
    flag("--cache-type-k", choices=["f16", "q8_0", "q4_0"], help="KV cache type of keys (default: f16)")
    flag("--cache-type-v", choices=["f16", "q8_0", "q4_0"],
         help="KV cache type of values (default: f16); quantized ones need flash attention (auto turns it on)")
    flag("--kv-unified", action="store_const", const=True,
         help="one KV pool of --n-ctx cells shared by all slots instead of --parallel x --n-ctx; when it is full the "
              "newest request ends (shortened: finish_reason length; before its first token: error kv_cache_full)")
    flag("--ctx-checkpoints", "--swa-checkpoints", dest="ctx_checkpoints", type=int,
         help="snapshots per slot of the memory a recurrent or hybrid model (Qwen3.5) or a small sliding window "
              "cannot roll back, taken near each prompt's end, so the next chat turn resumes from one instead of "
              "evaluating the whole conversation again (default: 8; 0: off)")
    flag("--ctx-checkpoint-mib", type=float, help="most MiB the context checkpoints of one model hold, oldest dropped "
                                                "first (default: 512)")
    flag("--swa-full", choices=["on", "off"],
         help="sliding-window layers (Gemma 3) keep the whole context (on) or only their window, with context "
              "checkpoints for reuse (off) (default: off: at 32k tokens Gemma 3 270M needs 486 MB instead of "
              "952, with the same reuse)")
    flag("--threads", type=int, help="most CPU threads decoding uses (default: all available cores); fewer while "
                                     "fewer decode faster, e.g. beside another busy process")
    flag("--fixed-threads", action="store_const", const=True, help="always use --threads threads, never fewer")
    flag("--parallel", type=int, help="requests decoded together; the KV cache holds this many --n-ctx sequences (default: 4)")
    flag("--max-queue", type=int, help="requests that may wait before 429 (default: 16)")
    flag("--api-key", help="require 'Authorization: Bearer KEY' (or Anthropic's 'x-api-key: KEY') on /v1/* routes")
    flag("--api-key-file", help="read the API key from this file (keeps it out of the process list)")
    flag("--cors-origin", action="append",
         help="allow browser pages from this origin (repeatable; '*' for any); CORS is off by default")
    flag("--shutdown-grace", type=float, help="seconds open streams get to finish on SIGTERM/Ctrl-C (default: 10)")
    flag("--model-alias", action="append",
         help="the id /v1/models shows and requests name, per --model in order (default: the file name)")
    flag("--mmproj", action="append",
         help="the projector GGUF (mmproj) that lets a model see images, per --model in order: path, file name in "
              "models/, or OWNER/REPO/FILE.gguf on Hugging Face")
    flag("--models-file", help="a JSON or TOML file listing more models: id, model (path or REPO/FILE), and per model "
                                "role, n_ctx, parallel, n_gpu_layers, chat_template")
    flag("--max-loaded", type=int, help="models held in memory at once; others load on first use, the least "
                                        "recently used idle one is unloaded (default: all)")
    flag("--idle-unload", type=float, help="unload a model after this many seconds without requests (default: 0, never)")
    flag("--allow-image-urls", action="store_const", const=True,
         help="fetch http(s) image URLs in requests (default: off, only inline data URLs): public addresses only "
              "(never loopback, private or link-local, also after redirects), 8 MiB each, --image-url-timeout in all")
    flag("--image-url-timeout", type=float, help="seconds a request's image URLs may take together, first lookup to "
                                                 "last byte (default: 10)")
    flag("--max-body-bytes", type=int, help="largest request body accepted (default: 10 MiB)")
    flag("--max-connections", type=int, help="open client connections before new ones wait (default: 1000)")
    flag("--header-timeout", type=float, help="seconds a client gets to send a request's headers (default: 10)")
    flag("--idle-timeout", type=float, help="seconds an idle keep-alive connection stays open (default: 60)")
    flag("--metrics-public", action="store_const", const=True,
         help="serve /metrics without the API key (by default it needs the key when one is set)")
    flag("--chat-template", help="render chats with this Jinja file or llama.cpp built-in template (e.g. chatml, gemma, "
                                 "llama3) instead of the GGUF's own (default: the GGUF's, else its architecture's built-in)")
    flag("--reasoning", choices=["on", "off", "auto"],
         help="thinking models (Qwen3, QwQ, Qwen3.5): think, don't, or as the template defaults (default: auto)")
    flag("--reasoning-format", choices=["separate", "none"],
         help="separate: reasoning in reasoning_content; none: the raw <think> text stays in content (default: separate)")
    flag("--rpc", help="HOST:PORT[,HOST:PORT...] of `edge-server worker`s: their devices hold the model's layers and KV "
                        "cache, by free memory (trusted networks only: the protocol has no authentication)")
    flag("--tensor-split", help="shares of the layers per device, e.g. 3,1: the --rpc workers in order, then local GPUs")
    flag("--rpc-timeout", type=float, help="seconds a decoding step may wait for the workers before they count as "
                                           "lost: running requests end with an error, the server exits 3 (default: 120)")
    flag("--spec-type", choices=["none", "ngram-simple", "ngram-mod", "draft-simple"],
         help="speculative decoding (default: none): ngram-simple verifies, with each token, the tokens that followed "
              "the last few ones where they appeared before in the prompt or output (fast on copied or edited text); "
              "ngram-mod also where they appeared in earlier requests (fast on answers that repeat earlier ones; "
              "requests' speed then hints at each other's text: for single-user servers); "
              "draft-simple what a small model of the same family (--spec-draft-model) writes ahead")
    flag("--spec-draft-model", "--model-draft", dest="spec_draft_model",
         help="the draft model's GGUF (same tokenizer as the model, e.g. Qwen2.5-0.5B-Instruct for Qwen2.5-7B); "
              "implies --spec-type draft-simple")
    flag("--spec-draft-p-min", type=float,
         help="the draft model writes ahead while its likeliest token is at least this likely (default: 0.75)")
    flag("--spec-draft-n-max", type=int, help="most tokens drafted per step and request (default: 16)")
    flag("--spec-draft-n-min", type=int, help="drafts shorter than this are not verified (default: 0)")
    # Output limits, as llama-server's --n-predict.
    flag("--n-predict", "-n", type=int, help="tokens a generation may write when the request sets no limit "
                                              "(default: -1, until the context is full)")
    flag("--n-predict-max", type=int, help="most tokens any generation may write; larger requests are clamped and "
                                           "end with finish_reason length (default: -1, only the context limits)")
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
        message = first["msg"].removeprefix("Value error, ")
        if first["loc"]:
            message = f"invalid --{str(first['loc'][0]).replace('_', '-')}: {message}"
        print(f"edge-server: {message}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def configure_logging(level: str) -> None:
    """One log format for the server, llama.cpp's wrapper and waitress."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("gguf").setLevel(logging.WARNING)  # the demo model writer narrates every file


def pull(argv: Sequence[str]) -> int:
    """`edge-server pull [OWNER/REPO/FILE.gguf]`: download a GGUF into models/ (default: Qwen3.5 sized for this
    machine's memory)."""
    from edge_server.engine.types import ModelLoadError
    from edge_server.modelstore import default_model, download, split_hub_spec

    parser = argparse.ArgumentParser(prog="edge-server pull", description=pull.__doc__)
    parser.add_argument("spec", nargs="?", help="default: Qwen3.5 0.8B, 2B or 4B Q4_K_M by memory, e.g. "
                                                "unsloth/Qwen3.5-2B-GGUF/Qwen3.5-2B-Q4_K_M.gguf")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    args = parser.parse_args(argv)
    configure_logging("info")
    try:
        repo, filename = split_hub_spec(args.spec) if args.spec else default_model()
        print(download(repo, filename, args.models_dir))
    except ModelLoadError as error:
        print(f"edge-server pull: {error}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def list_models(argv: Sequence[str]) -> int:
    """`edge-server models`: the GGUFs in models/, described from their metadata."""
    from edge_server.modelstore import local_models

    parser = argparse.ArgumentParser(prog="edge-server models", description=list_models.__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    args = parser.parse_args(argv)
    rows = [("FILE", "SIZE", "ARCH", "QUANT", "CONTEXT", "TEMPLATE")]
    for model in local_models(args.models_dir):
        if model.error:
            rows.append((model.file, f"{model.size_bytes / 1e6:.1f} MB", "-", "-", "-", model.error))
        else:
            rows.append((model.file, f"{model.size_bytes / 1e6:.1f} MB", model.architecture, model.quantization,
                         str(model.context_length or "?"), "yes" if model.chat_template else "no"))
    if len(rows) == 1:
        print(f"no GGUF models in {args.models_dir}/ (edge-server pull downloads one)")
        return 0
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("pull", "models"):
        return (pull if argv[0] == "pull" else list_models)(argv[1:])
    if argv and argv[0] == "worker":
        from edge_server.worker import main as worker

        return worker(argv[1:])
    settings = parse_settings(argv)
    configure_logging(settings.log_level)
    return_large_buffers_to_the_system()
    from edge_server.server import serve

    return serve(settings)


if __name__ == "__main__":
    raise SystemExit(main())
