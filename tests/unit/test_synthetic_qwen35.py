"""The random-weight Qwen3.5-architecture model (devtools/synthetic.write_qwen35_model, cached by
devtools/assets.qwen35_model): llama.cpp loads it as its hybrid `qwen35` (Gated DeltaNet layers, full
attention every 4th) with the real Qwen3.5 template and tokenizer, and its greedy output is ordinary words,
never a control token, the same for the same prompt. Decoded here with llama-cpp-python's low-level API."""

from __future__ import annotations

import mmap
import struct

import gguf
import llama_cpp
import numpy as np
import pytest
from llama_cpp import _internals as internals

from edge_server import ggufmeta
from edge_server.devtools import assets, synthetic
from edge_server.ggufmeta import read_gguf_metadata
from tests.conftest import or_fail

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
N_CTX = 1024


@pytest.fixture(scope="module")
def qwen35_path():
    return or_fail(assets.qwen35_model)


@pytest.fixture(scope="module")
def vocab() -> synthetic.Vocab:
    path, added = or_fail(assets.qwen_vocab, "qwen3.5")
    return synthetic.read_vocab(path, added)


@pytest.fixture(scope="module")
def loaded(qwen35_path):
    """(model, context with two sequences) loaded as edge_server.engine.loader loads a model, on the CPU."""
    llama_cpp.llama_backend_init()
    model_params = llama_cpp.llama_model_default_params()
    model_params.n_gpu_layers = 0
    model = internals.LlamaModel(path_model=str(qwen35_path), params=model_params, verbose=False)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_seq_max, params.n_batch, params.n_ubatch = 2 * N_CTX, 2, 512, 512
    params.n_threads = params.n_threads_batch = 1  # two would spin against each other on a shared 2-core box
    params.no_perf = True
    context = internals.LlamaContext(model=model, params=params, verbose=False)
    yield model, context
    context.close()
    model.close()


def prompt_tokens(model, vocab: synthetic.Vocab, template: str, messages=MESSAGES) -> list[int]:
    prompt = synthetic.render_generation_prompt(vocab, template, messages)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")  # Qwen3.5's generation prompt opens the block
    return model.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)


def greedy(model, context, prompt: list[int], *, seq: int, n: int = 30,
           specials: np.ndarray | None = None) -> list[int]:
    """`n` greedy tokens after `prompt`, decoded in sequence `seq`; with `specials` (ids), checks at every step
    that none of them scores above 0 (their rows of the tied LM head are zero) and the chosen token far above."""
    batch = internals.LlamaBatch(n_tokens=len(prompt), embd=0, n_seq_max=1, verbose=False)

    def decode(tokens: list[int], start: int) -> np.ndarray:
        b = batch.batch
        b.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, start + i, 1, i == len(tokens) - 1
            b.seq_id[i][0] = seq
        context.decode(batch)
        return np.ctypeslib.as_array(context.get_logits_ith(-1), shape=(model.n_vocab(),)).copy()

    logits = decode(prompt, 0)
    out: list[int] = []
    for step in range(n):
        token = int(np.argmax(logits))
        if specials is not None:
            assert logits[specials].max() <= 0.0 < 5.0 < logits[token], (step, token)
        out.append(token)
        logits = decode([token], len(prompt) + step)
    batch.close()
    return out


def test_llama_cpp_loads_it_as_the_hybrid_qwen35_with_the_real_tokenizer_and_template(loaded, qwen35_path):
    model, _ = loaded
    assert qwen35_path.stat().st_size < 80_000_000
    assert llama_cpp.llama_model_is_hybrid(model.model)
    assert not llama_cpp.llama_model_is_recurrent(model.model)
    metadata = model.metadata()
    assert metadata["general.architecture"] == "qwen35"
    assert int(metadata["qwen35.context_length"]) >= 32768
    vocab_path, _ = assets.qwen_vocab("qwen3.5")
    assert model.n_vocab() == len(read_gguf_metadata(vocab_path)["tokenizer.ggml.tokens"])
    assert metadata["tokenizer.chat_template"] == assets.qwen_template("qwen3.5")
    assert model.token_get_text(model.token_eos()) == "<|im_end|>"  # as released Qwen GGUFs (not <|endoftext|>)
    assert not model.add_bos_token()
    vocab = model.vocab
    for text in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert llama_cpp.llama_vocab_is_control(vocab, model.tokenize(text.encode(), False, True)[0])
    # Qwen3.5's tags are single (user-defined) tokens, as in the released tokenizer.
    for text in ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"):
        assert len(model.tokenize(text.encode(), False, True)) == 1, text


def tensor_infos(path) -> dict[str, tuple[list[int], int]]:
    """name -> (ggml dims, ggml type) from the GGUF's tensor infos, which follow its metadata (gguf.GGUFReader
    would take ~25 s over the 151,936-token vocabulary)."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        header = ggufmeta._Header(data, arrays=False)
        header.metadata()
        (count,) = struct.unpack_from("<Q", data, 8)
        infos = {}
        for _ in range(count):
            name = header._string()
            dims = [header._unpack("<Q") for _ in range(header._unpack("<I"))]
            infos[name] = (dims, header._unpack("<I"))
            header._unpack("<Q")  # the data offset
        return infos


def test_the_file_holds_both_layer_kinds_with_tied_embeddings(qwen35_path):
    infos = tensor_infos(qwen35_path)
    metadata = read_gguf_metadata(qwen35_path, arrays=True)
    assert "output.weight" not in infos  # the LM head is token_embd
    n_embd, n_head, head_dim, interval = (metadata[f"qwen35.{key}"] for key in (
        "embedding_length", "attention.head_count", "attention.key_length", "full_attention_interval"))
    assert (metadata["qwen35.block_count"], interval) == (4, 4)
    for layer in range(3):  # Gated DeltaNet
        assert f"blk.{layer}.ssm_a" in infos and f"blk.{layer}.attn_qkv.weight" in infos
        assert f"blk.{layer}.attn_q.weight" not in infos
        assert infos[f"blk.{layer}.ssm_conv1d.weight"][1] == gguf.GGMLQuantizationType.F32  # all ggml_ssm_conv takes
    # The attention layer's Q projection is query plus gate: twice n_head x key_length.
    assert infos["blk.3.attn_q.weight"][0] == [n_embd, 2 * n_head * head_dim]
    assert "blk.3.ssm_a" not in infos
    assert metadata["qwen35.rope.dimension_sections"] == [2, 1, 1, 0]  # required: llama.cpp ropes qwen35 by IMROPE
    assert metadata["qwen35.rope.dimension_count"] == head_dim // 4


def test_greedy_decoding_babbles_words_and_never_a_control_token(loaded, vocab):
    model, context = loaded
    context.kv_cache_clear()
    specials = np.array([t for t, kind in enumerate(vocab.types) if kind != gguf.TokenType.NORMAL])
    assert len(specials) > 250  # controls, the tags put in the padding slots, and the remaining padding
    tokens = greedy(model, context, prompt_tokens(model, vocab, assets.qwen_template("qwen3.5")), seq=0,
                    specials=specials)
    for token in tokens:
        assert not llama_cpp.llama_vocab_is_control(model.vocab, token)
        assert not llama_cpp.llama_vocab_is_eog(model.vocab, token)
        assert vocab.types[token] == gguf.TokenType.NORMAL
    assert len(set(tokens)) >= 15, tokens  # not one token over and over, nor a short loop
    assert max(tokens.count(token) for token in tokens) <= 5, tokens
    text = model.detokenize(tokens).decode("utf-8", "replace")
    assert sum(word.isascii() and word.isalpha() for word in text.split()) >= 10, text


def test_the_same_prompt_decodes_to_the_same_tokens_in_fresh_sequences(loaded, vocab):
    model, context = loaded
    context.kv_cache_clear()
    prompt = prompt_tokens(model, vocab, assets.qwen_template("qwen3.5"))
    first = greedy(model, context, prompt, seq=0)
    second = greedy(model, context, prompt, seq=1)  # beside the first, in its own recurrent state and KV
    context.kv_cache_clear()
    third = greedy(model, context, prompt, seq=0)
    assert first == second == third
    # ... and what it says depends on what was asked.
    other = prompt_tokens(model, vocab, assets.qwen_template("qwen3.5"),
                          [{"role": "user", "content": "What is the capital of Germany?"}])
    context.kv_cache_clear()
    assert greedy(model, context, other, seq=0) != first


def test_writer_refuses_shapes_llama_cpp_cannot_run(tmp_path):
    path, added = assets.qwen_vocab("qwen3.5")
    with pytest.raises(ValueError):
        synthetic.write_qwen35_model(tmp_path / "bad.gguf", path, "", added_tokens=added, n_head=3, n_head_kv=2)
    assert not (tmp_path / "bad.gguf").exists()


def test_mrope_sections_scale_qwen35s():
    assert synthetic._mrope_sections(32) == [11, 11, 10, 0]  # Qwen3.5: head_dim 256, 64 rotated dims
    assert synthetic._mrope_sections(4) == [2, 1, 1, 0]
    assert sum(synthetic._mrope_sections(7)) == 7

