"""One frozen `Settings`: command line > `EDGE_*` environment > defaults, validated before the model loads."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENV_PREFIX = "EDGE_"
EXIT_CONFIG = 2  # exit status for bad flags, an unusable model file or a port already taken


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and container CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


class Settings(BaseModel):
    """Everything the server is configured with; see README's configuration table."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: tuple[str, ...] = Field((), description="GGUF paths, file names in models/, or REPO/FILE on Hugging Face; "
                                                   "the first is the default model")
    models_dir: Path = Field(Path("models"), description="where downloaded and generated models live")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    n_ctx: int | None = Field(None, ge=16, description="tokens per request (prompt + completion); default: as trained, "
                                                       "as far as memory holds the KV cache (engine/contextsize.py)")
    n_gpu_layers: int | Literal["auto"] = "auto"
    flash_attn: Literal["auto", "on", "off"] = "auto"
    cache_type_k: Literal["f16", "q8_0", "q4_0"] = Field("f16", description="KV cache type of keys")
    cache_type_v: Literal["f16", "q8_0", "q4_0"] = Field("f16", description="KV cache type of values (quantized: needs flash attention)")
    kv_unified: bool = Field(False, description="one KV pool of --n-ctx cells shared by all slots (not --parallel x --n-ctx)")
    ctx_checkpoints: int = Field(8, ge=0, le=256, description="context checkpoints per slot for models whose memory "
                                                             "cannot drop a suffix (recurrent, hybrid, small SWA)")
    ctx_checkpoint_mib: float = Field(512, ge=0, description="most MiB all context checkpoints of a model hold")
    swa_full: bool = Field(False, description="sliding-window layers keep the whole context (more memory, no "
                                              "checkpoints needed) instead of only their window")
    threads: int = Field(default_factory=available_cores, ge=1)
    fixed_threads: bool = Field(False, description="always decode with --threads threads, never fewer")
    parallel: int = Field(4, ge=1, le=64)
    max_queue: int = Field(16, ge=0, le=4096)
    api_key: str | None = None
    api_key_file: Path | None = None
    cors_origin: tuple[str, ...] = ()
    model_alias: tuple[str, ...] = Field((), description="the ids of the models, in --model order (default: file stem)")
    mmproj: tuple[str, ...] = Field((), description="the projectors (mmproj GGUFs) that let the models see images, in "
                                                    "--model order: path, file name in models/, or REPO/FILE")
    models_file: Path | None = Field(None, description="a JSON or TOML file listing models (id, model, role, "
                                                        "n_ctx, parallel, n_gpu_layers, chat_template)")
    max_loaded: int | None = Field(None, ge=1, description="models held in memory at once (default: all of them)")
    idle_unload: float = Field(0.0, ge=0, description="unload a model after this many idle seconds (0: never)")
    allow_image_urls: bool = Field(False, description="fetch http(s) image URLs (public addresses only, "
                                                      "8 MiB and --image-url-timeout per image)")
    image_url_timeout: float = Field(10.0, gt=0, le=300, description="seconds a request's image URLs may take "
                                                                     "together, first lookup to last byte")
    image_url_networks: tuple[str, ...] = Field((), description="tests only: networks image URLs may reach "
                                                                "although they are not public (e.g. 127.0.0.2/32)")
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_connections: int = Field(1000, ge=8, le=100_000, description="open client connections before new ones wait")
    header_timeout: float = Field(10.0, gt=0, description="seconds a client gets to send a request's headers")
    idle_timeout: float = Field(60.0, gt=0, description="seconds an idle keep-alive connection stays open")
    metrics_public: bool = Field(False, description="serve /metrics without the API key")
    heartbeat_seconds: float = Field(2.0, gt=0)
    download_timeout: float = Field(10.0, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_grace: float = Field(10.0, ge=0)
    chat_template: str | None = Field(None, description="a Jinja file or llama.cpp built-in name instead of the GGUF's template")
    reasoning: Literal["on", "off", "auto"] = Field("auto", description="thinking models think (on), do not (off) or as their template defaults (auto)")
    reasoning_format: Literal["separate", "none"] = Field("separate", description="reasoning in reasoning_content (separate) or left in content (none)")
    rpc: tuple[str, ...] = Field((), description="HOST:PORT of `edge-server worker`s whose devices hold layers")
    tensor_split: tuple[float, ...] = Field((), description="shares of the layers per device: the --rpc workers in "
                                                             "order, then local GPUs (default: by free memory)")
    rpc_timeout: float = Field(120.0, gt=0, description="seconds one decoding step may wait for the RPC workers "
                                                        "before they count as lost")
    spec_type: Literal["none", "ngram-simple", "ngram-mod", "draft-simple"] = Field(
        "none", description="speculative decoding: ngram-simple proposes continuations found in the prompt and output, "
                            "ngram-mod also in earlier requests' prompts and outputs, draft-simple what "
                            "--spec-draft-model writes ahead")
    spec_draft_model: Path | None = Field(None, description="the draft model of draft-simple: a smaller GGUF with "
                                                            "the same tokenizer (alone, it turns draft-simple on)")
    spec_draft_p_min: float = Field(0.75, ge=0.0, le=1.0, description="the draft model writes ahead while its "
                                                                       "likeliest token is at least this likely")
    spec_draft_n_max: int = Field(16, ge=1, le=256, description="most tokens drafted per step and request")
    spec_draft_n_min: int = Field(0, ge=0, le=256, description="drafts shorter than this are not verified")
    # Output limits (coding agents send max_tokens of 32,000-64,000, or none).
    n_predict: int = Field(-1, ge=-1, description="tokens a generation may write when the request sets no limit "
                                                  "(-1: until the context is full)")
    n_predict_max: int = Field(-1, ge=-1, description="most tokens any generation may write, whatever the request "
                                                      "asks (-1: no ceiling but the context)")
    fault_seed: int | None = Field(None, description="tests only: requests with this seed fail mid-generation")

    @field_validator("model", "model_alias", "mmproj", mode="before")
    @classmethod
    def _several(cls, value: Any) -> Any:
        if isinstance(value, str):  # EDGE_MODEL="a.gguf,b.gguf"
            value = value.split(",")
        return tuple(item.strip() for item in value or () if item and item.strip())

    @field_validator("image_url_networks", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        if isinstance(value, str):  # EDGE_IMAGE_URL_NETWORKS="127.0.0.2/32,::1/128"
            value = value.split(",")
        networks = tuple(item.strip() for item in value or () if item and item.strip())
        try:
            for network in networks:
                ipaddress.ip_network(network, strict=False)
        except ValueError as error:
            raise ValueError(f"not a network: {error}") from None
        return networks

    @field_validator("rpc", mode="before")
    @classmethod
    def _endpoints(cls, value: Any) -> Any:
        from edge_server.engine.rpc import parse_endpoint  # pure: no llama.cpp import

        if isinstance(value, str):  # --rpc a:1,b:2 and EDGE_RPC
            value = value.split(",")
        endpoints = tuple(item.strip() for item in value or () if item and item.strip())
        for endpoint in endpoints:
            parse_endpoint(endpoint)
        if len(set(endpoints)) != len(endpoints):
            raise ValueError("the same worker is named twice")
        return endpoints

    @field_validator("tensor_split", mode="before")
    @classmethod
    def _shares(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = [float(part) for part in value.replace("/", ",").split(",") if part.strip()]
            except ValueError:
                raise ValueError("must be numbers separated by commas, e.g. 3,1") from None
        shares = tuple(value or ())
        if shares and (any(share < 0 for share in shares) or not sum(shares) > 0):
            raise ValueError("shares must be >= 0 with a positive sum")
        return shares

    @model_validator(mode="after")
    def _draft_model_for_draft_simple(self) -> Settings:
        if self.spec_draft_model is not None and self.spec_type == "none":
            object.__setattr__(self, "spec_type", "draft-simple")  # frozen: set once while validating
        if self.spec_type == "draft-simple" and self.spec_draft_model is None:
            raise ValueError("--spec-type draft-simple needs --spec-draft-model PATH (a smaller model of the same "
                             "family)")
        if self.spec_type in ("ngram-simple", "ngram-mod") and self.spec_draft_model is not None:
            raise ValueError(f"--spec-draft-model is for --spec-type draft-simple, not {self.spec_type}")
        return self

    @model_validator(mode="after")
    def _aliases_match_models(self) -> Settings:
        if len(self.model_alias) > max(1, len(self.model)):
            raise ValueError(f"{len(self.model_alias)} --model-alias values for {len(self.model)} --model values")
        if len(set(self.model_alias)) != len(self.model_alias):
            raise ValueError("--model-alias values must differ")
        if len(self.mmproj) > max(1, len(self.model)):
            raise ValueError(f"{len(self.mmproj)} --mmproj values for {len(self.model)} --model values")
        return self

    @model_validator(mode="after")
    def _quantized_values_need_flash_attention(self) -> Settings:
        if self.cache_type_v != "f16" and self.flash_attn == "off":
            raise ValueError(f"--cache-type-v {self.cache_type_v} needs flash attention (llama.cpp computes attention "
                             "over quantized values only there): use --flash-attn auto or on, or --cache-type-v f16")
        return self

    @field_validator("cors_origin", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        if isinstance(value, str):  # EDGE_CORS_ORIGIN="https://a.example,https://b.example"
            value = value.split(",")
        return tuple(origin.strip().rstrip("/") for origin in value or () if origin.strip())

    @model_validator(mode="after")
    def _key_from_file(self) -> Settings:
        if self.api_key_file is not None and self.api_key is None:
            try:
                key = self.api_key_file.read_text().strip()
            except OSError as error:
                raise ValueError(f"cannot read --api-key-file: {error.strerror or error}") from None
            if not key:
                raise ValueError("--api-key-file is empty")
            object.__setattr__(self, "api_key", key)  # frozen: set once while validating
        return self

    @field_validator("n_gpu_layers", mode="before")
    @classmethod
    def _parse_gpu_layers(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() != "auto":
            try:
                return int(value)
            except ValueError:
                raise ValueError("must be 'auto' or a whole number of layers (-1 = all)") from None
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        if value is not None:
            from edge_server.engine.chat_templates import template_override  # imports llama.cpp: only when asked

            template_override(value)
        return value

    @field_validator("api_key", "chat_template", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address or name (only this machine reaches it)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def env_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """Settings named by `EDGE_<FIELD>` environment variables (e.g. EDGE_PORT, EDGE_N_CTX)."""
    overrides = {}
    for name in Settings.model_fields:
        value = environ.get(ENV_PREFIX + name.upper())
        if value is not None:
            overrides[name] = value
    return overrides


def load_settings(cli_values: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Merge command-line values (None = not given) over the environment over the defaults."""
    merged: dict[str, Any] = env_overrides(os.environ if environ is None else environ)
    merged.update({key: value for key, value in cli_values.items() if value is not None})
    return Settings.model_validate(merged)
