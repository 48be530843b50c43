"""Resolve which GGUF to serve: a path, a file in models/, `REPO/FILE` from Hugging Face, or the demo model."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_server.engine.types import ModelLoadError

log = logging.getLogger("edge_server.models")

# Qwen3.5 (hybrid Gated DeltaNet + attention, thinking, XML tools), Q4_K_M, sized by the machine's memory: Qwen
# publishes no GGUF of it, Unsloth's are the ones llama.cpp's own guides point to. (smallest RAM, repo, file)
DEFAULT_CHOICES = (
    (12 << 30, "unsloth/Qwen3.5-4B-GGUF", "Qwen3.5-4B-Q4_K_M.gguf"),  # 2.7 GB of weights
    (6 << 30, "unsloth/Qwen3.5-2B-GGUF", "Qwen3.5-2B-Q4_K_M.gguf"),  # 1.3 GB
    (0, "unsloth/Qwen3.5-0.8B-GGUF", "Qwen3.5-0.8B-Q4_K_M.gguf"),  # 0.5 GB
)
DEFAULT_PROJECTOR = "mmproj-F16.gguf"  # the vision projector beside each of those models in Unsloth's repos
PROJECTORS_DIR = "mmproj"  # under models/: models/mmproj/<model file's stem>/*.gguf is that model's projector
HUB_HOST = "huggingface.co"
GENERATED_DIR = "generated"  # under models/: demo and test models, never picked as "the newest GGUF"
DEMO_FILE = "edge-demo.gguf"
DEMO_MODEL_ID = "edge-server-demo"
DEMO_WARNING = (
    "OFFLINE DEMO MODEL: no real model was found or downloadable, so edge-server is serving a tiny "
    "generated model that can only say one sentence. Run `make model` (or `edge-server --model PATH.gguf`) "
    "when online to serve Qwen3.5."
)


@dataclass(frozen=True)
class ResolvedModel:
    """The file to load, the id clients see, and a warning when it is the demo model."""

    path: Path
    model_id: str
    demo_warning: str | None = None
    mmproj: Path | None = None  # its projector, found in models/mmproj/<stem>/ or downloaded with the default model


def resolve_model(spec: str | None, models_dir: Path, *, alias: str | None = None, timeout: float = 10.0) -> ResolvedModel:
    """Find or fetch the model named by `--model` (None: newest local GGUF, else default download, else demo)."""
    if spec:
        path = _local_model(spec, models_dir) or download(*split_hub_spec(spec), models_dir, timeout=timeout)
        return ResolvedModel(path, alias or path.stem, mmproj=local_projector(models_dir, path))
    local = newest_gguf(models_dir)
    if local is not None:
        return ResolvedModel(local, alias or local.stem, mmproj=local_projector(models_dir, local))
    repo, filename = default_model()
    log.info("no --model and no GGUF in %s: the default for %.1f GiB of memory is %s/%s (another: --model "
             "OWNER/REPO/FILE.gguf)", models_dir, total_memory() / (1 << 30), repo, filename)
    try:
        path = download(repo, filename, models_dir, timeout=timeout)
    except ModelLoadError as error:
        log.warning("could not download the default model: %s", error)
    else:
        return ResolvedModel(path, alias or path.stem, mmproj=_default_projector(repo, models_dir, path, timeout))
    return ResolvedModel(demo_model(models_dir), alias or DEMO_MODEL_ID, DEMO_WARNING)


def total_memory() -> int:
    """Bytes of physical memory (0 when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def default_model(memory: int | None = None) -> tuple[str, str]:
    """(repo, file) of the Qwen3.5 GGUF for a machine with `memory` bytes (default: this one's): the largest
    whose weights, context and the system fit comfortably."""
    memory = total_memory() if memory is None else memory
    for smallest, repo, filename in DEFAULT_CHOICES:
        if memory >= smallest:
            return repo, filename
    return DEFAULT_CHOICES[-1][1:]


def local_projector(models_dir: Path, model: Path) -> Path | None:
    """The projector kept for `model` in models/mmproj/<its stem>/ (the newest GGUF there), if any."""
    found = [p for p in (Path(models_dir) / PROJECTORS_DIR / model.stem).glob("*.gguf") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _default_projector(repo: str, models_dir: Path, model: Path, timeout: float) -> Path | None:
    """The default model's projector, downloaded beside it; None (text only, with a warning) when it cannot be."""
    try:
        return download(repo, DEFAULT_PROJECTOR, Path(models_dir) / PROJECTORS_DIR / model.stem, timeout=timeout)
    except ModelLoadError as error:
        log.warning("serving %s without images: %s", model.name, error)
        return None


def newest_gguf(models_dir: Path) -> Path | None:
    """The most recently modified `*.gguf` directly in `models_dir` (generated models and projectors excluded)."""
    candidates = [p for p in Path(models_dir).glob("*.gguf") if p.is_file() and not is_projector(p)]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def is_projector(path: Path) -> bool:
    """Whether a GGUF is a projector (mmproj) rather than a model: its name says mmproj, or its `general.type`
    does, or its architecture is `clip` (older projectors); an unreadable file is not one (loading it says what
    is wrong)."""
    if "mmproj" in path.name.lower():
        return True
    from edge_server.ggufmeta import read_gguf_metadata

    try:
        metadata = read_gguf_metadata(path, arrays=False)
    except (ValueError, OSError):
        return False
    return metadata.get("general.type") == "mmproj" or metadata.get("general.architecture") == "clip"


def demo_model(models_dir: Path) -> Path:
    """The offline demo model, generated on first use."""
    from edge_server.devtools.synthetic import DEMO_SCRIPT, write_scripted_model

    path = Path(models_dir) / GENERATED_DIR / DEMO_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_scripted_model(path, DEMO_SCRIPT)
    return path


def split_hub_spec(spec: str) -> tuple[str, str]:
    """`OWNER/REPO/FILE.gguf` -> (`OWNER/REPO`, `FILE.gguf`); raises `ModelLoadError` for anything else."""
    parts = spec.strip("/").split("/")
    if len(parts) < 3 or not spec.endswith(".gguf"):
        raise ModelLoadError(
            f"model {spec!r} is neither a file nor a Hugging Face OWNER/REPO/FILE.gguf name"
        )
    return "/".join(parts[:2]), "/".join(parts[2:])


def _local_model(spec: str, models_dir: Path) -> Path | None:
    for candidate in (Path(spec).expanduser(), Path(models_dir) / spec):
        if candidate.is_file():
            return candidate
    looks_like_path = spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") < 2
    if spec.endswith(".gguf") and looks_like_path:
        raise ModelLoadError(f"model file not found: {spec} (looked in . and {models_dir}/)")
    return None


def hub_reachable(timeout: float) -> str | None:
    """None if Hugging Face answers a TCP connect within `timeout` seconds, else the reason it does not."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(f"cannot reach {HUB_HOST}: {error.strerror or error}")

    # A thread bounds the DNS lookup too, which socket timeouts do not cover.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer from {HUB_HOST} within {timeout:g}s"


def download(repo: str, filename: str, models_dir: Path, *, timeout: float = 10.0) -> Path:
    """Fetch `repo`/`filename` into `models_dir` with a progress bar (resumable); `ModelLoadError` offline."""
    reason = hub_reachable(timeout)
    if reason is not None:
        raise ModelLoadError(f"offline ({reason}); cannot download {repo}/{filename}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    log.info("downloading %s/%s into %s/", repo, filename, models_dir)
    try:
        return Path(hf_hub_download(repo, filename, local_dir=models_dir, etag_timeout=timeout))
    except (HfHubHTTPError, EntryNotFoundError, OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"download of {repo}/{filename} failed: {first_line}") from None


@dataclass(frozen=True)
class LocalModel:
    """What a GGUF file is, read from its metadata (not from its name)."""

    file: str
    size_bytes: int
    architecture: str = "?"
    quantization: str = "?"
    context_length: int | None = None
    chat_template: bool = False
    error: str | None = None


def describe_gguf(path: Path) -> LocalModel:
    """Read a GGUF's metadata; a file that is not a readable GGUF gets `error` set."""
    import gguf

    from edge_server.ggufmeta import read_gguf_metadata

    size = path.stat().st_size
    try:
        metadata = read_gguf_metadata(path, arrays=False)
        arch = str(metadata["general.architecture"])
        file_type = metadata.get("general.file_type")
        quantization = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else "?"
        context = metadata.get(f"{arch}.context_length")
        return LocalModel(path.name, size, arch, quantization, int(context) if context is not None else None,
                          "tokenizer.chat_template" in metadata)
    except (KeyError, ValueError, TypeError, OSError) as error:
        return LocalModel(path.name, size, error=f"not a readable GGUF ({type(error).__name__}: {error})")


def local_models(models_dir: Path) -> list[LocalModel]:
    """Every `*.gguf` in `models_dir` and its generated/ folder, newest first."""
    root = Path(models_dir)
    paths = [p for pattern in ("*.gguf", f"{GENERATED_DIR}/*.gguf") for p in root.glob(pattern) if p.is_file()]
    paths.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [describe_gguf(p) for p in paths]


class ModelsFileEntry(BaseModel):
    """One model of `--models-file`: its id, where it is, and settings of its own."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    model: str = Field(min_length=1, description="GGUF path, file name in models/, or OWNER/REPO/FILE.gguf")
    role: Literal["chat", "embedding"] | None = None  # default: read from the GGUF
    n_ctx: int | None = Field(None, ge=16)
    parallel: int | None = Field(None, ge=1, le=64)
    n_gpu_layers: int | Literal["auto"] | None = None
    chat_template: str | None = None
    mmproj: str | None = Field(None, min_length=1, description="its projector: path, file name in models/, or REPO/FILE")

    def settings(self) -> dict[str, object]:
        """The settings this model overrides."""
        return self.model_dump(exclude={"id", "model", "role", "mmproj"}, exclude_none=True)


def read_models_file(path: Path) -> list[ModelsFileEntry]:
    """The models a JSON or TOML file lists (`[[models]]` tables, or a JSON list or `{"models": [...]}`);
    `ModelLoadError` naming what is wrong."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = _toml(text) if Path(path).suffix.lower() == ".toml" else json.loads(text)
        entries = data.get("models", []) if isinstance(data, dict) else data
        if not isinstance(entries, list) or not entries:
            raise ValueError("it lists no models (a list, or a 'models' list of tables)")
        return [ModelsFileEntry.model_validate(entry) for entry in entries]
    except (OSError, ValueError) as error:  # JSON's and TOML's decode errors are ValueErrors too
        reason = error.errors(include_url=False)[0] if isinstance(error, ValidationError) else None
        detail = f"{'.'.join(map(str, reason['loc']))}: {reason['msg']}" if reason else str(error)
        raise ModelLoadError(f"cannot use --models-file {path}: {detail}") from None


def _toml(text: str) -> object:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise ValueError("TOML needs Python 3.11 or newer; write the file as JSON") from None
    return tomllib.loads(text)
