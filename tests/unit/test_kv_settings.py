"""KV memory settings: flags and EDGE_ environment, and the one combination llama.cpp cannot run."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edge_server.cli import build_parser
from edge_server.settings import load_settings


def test_defaults_are_f16_caches_apart():
    settings = load_settings({}, environ={})
    assert (settings.cache_type_k, settings.cache_type_v, settings.kv_unified) == ("f16", "f16", False)


def test_flags_and_environment_set_them():
    args = vars(build_parser().parse_args(["--cache-type-k", "q8_0", "--kv-unified"]))
    args.pop("command")
    settings = load_settings(args, environ={"EDGE_CACHE_TYPE_V": "q4_0", "EDGE_CACHE_TYPE_K": "f16"})
    assert (settings.cache_type_k, settings.cache_type_v, settings.kv_unified) == ("q8_0", "q4_0", True)
    assert load_settings({}, environ={"EDGE_KV_UNIFIED": "1"}).kv_unified


def test_quantized_values_without_flash_attention_are_refused_with_the_way_out():
    with pytest.raises(ValidationError, match="needs flash attention"):
        load_settings({"cache_type_v": "q8_0", "flash_attn": "off"}, environ={})
    assert load_settings({"cache_type_k": "q8_0", "flash_attn": "off"}, environ={}).cache_type_k == "q8_0"


def test_unknown_cache_types_are_refused():
    with pytest.raises(ValidationError):
        load_settings({"cache_type_k": "q5_1"}, environ={})
