"""`make bench BENCH_ARGS=--structured-only [PEER=llama-server]`: structured output's cost, ours beside llama-server.

- Decode: one streamed request, the same prompt and model, plain and with a JSON schema (`response_format`), on the
  generated 0.5B-shape model, the hybrid Qwen3.5 0.8B-shape one and SmolLM2; tok/s decode only (first token to
  last) and end to end (request to `[DONE]`), their ratio; llama-server (its JSON-schema -> GBNF grammar sampler) in the same run. End of turn is
  banned so that plain text runs to `max_tokens`; the schema's array has no bound, so the JSON does too.
- Per step: the constraint's cost on the engine thread, llguidance's mask alone and with it applied to a logits
  row (what `engine/sampler.py` does each step), p50/p99, walking MaskBench's valid instances token by token, on
  SmolLM2's 49k vocabulary and on Qwen's 152k (Qwen2.5's vocabulary GGUF and Qwen3.5's).
- Compile: per schema, the limits check and the vocabulary-free compile (`schema_grammar`, on the HTTP thread
  before any prompt work) and the matcher for the vocabulary (`compile_matcher`), p50/p99/max, over the MaskBench
  sample the test tier uses when `--maskbench DIR` is given (else over `FIXED_SCHEMAS`).
- Fast-forward: through ours, the JSON decode rate also with it off (`speculative: false`) and the tokens it fed;
  on a valid order, how many steps leave exactly one token (what it feeds, exactly) and how many bytes
  llguidance's forced view (`compute_ff_bytes`, its own tokenization) knows ahead; and what feeding k tokens as
  one batch costs per token against k single steps on the 0.5B-shape model.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from pathlib import Path

import numpy as np

from edge_server.devtools.harness import free_port, start_server, stop

STRUCTURED_HEADING = "## Structured output (llguidance)"
# Per side and model, plain and constrained alternated; the best run of each is compared, as bench.py does: other
# processes on a shared host only ever slow a run down (medians swung 10-78 tok/s for one request here).
DECODE_RUNS = 5
MASKBENCH_SAMPLE = 200  # the test tier's sample: sorted names shuffled with Random(0), the first 200
# An order: fixed keys, an enum, bounded integers and strings, and at least 20 items (so output runs on).
ORDER_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["customer_reference_number", "shipping_priority_level", "line_items"],
    "properties": {
        "customer_reference_number": {"type": "integer", "minimum": 0, "maximum": 999999},
        "shipping_priority_level": {"enum": ["standard", "express", "overnight"]},
        "line_items": {"type": "array", "minItems": 20, "items": {
            "type": "object", "additionalProperties": False,
            "required": ["product_description", "quantity_ordered", "gift_wrapping_requested"],
            "properties": {"product_description": {"type": "string", "maxLength": 40},
                           "quantity_ordered": {"type": "integer", "minimum": 1, "maximum": 99},
                           "gift_wrapping_requested": {"type": "boolean"}}}}}}
ORDER_PROMPT = "Write order 1234 (express) as JSON: two line items, a lamp and three mugs, the mugs gift-wrapped."
# Realistic schemas for the compile figures when MaskBench's data is not at hand.
FIXED_SCHEMAS = [
    ORDER_SCHEMA,
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                                      "email": {"type": "string", "format": "email"}}, "required": ["name"]},
    {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "unit": {"enum": ["c", "f"]}},
     "required": ["city", "unit"], "additionalProperties": False},
    {"$defs": {"node": {"type": "object", "properties": {"value": {"type": "number"},
                                                         "children": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                                                      "maxItems": 4}}}}, "$ref": "#/$defs/node"},
    {"type": "array", "items": {"type": "object", "properties": {
        "date": {"type": "string", "format": "date"}, "amount": {"type": "number", "minimum": 0},
        "currency": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["date", "amount", "currency"]},
     "minItems": 1, "maxItems": 50},
    {"type": "object", "properties": {"answer": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
                                      "sources": {"type": "array", "items": {"type": "string", "format": "uri"}}}},
]


def percentiles(values: list[float]) -> dict:
    """p50, p99 and max of `values` (milliseconds in, milliseconds out), and how many there were."""
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": ordered[-1], "n": len(ordered)}


# ---- vocabularies, compile and per-step cost (no model weights) -----------------------------------------------

class LoadedVocab:
    """A GGUF's vocabulary alone, with llguidance's tokenizer built as the engine builds it."""

    def __init__(self, path: Path):
        import llama_cpp

        from edge_server.engine.vocab import Vocabulary

        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise SystemExit(f"cannot load the vocabulary of {path}")
        self.vocabulary = Vocabulary(llama_cpp.llama_model_get_vocab(self.model))
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        started = time.perf_counter()
        self.tokenizer = self.vocabulary.constraint_tokenizer()
        self.tokenizer_s = time.perf_counter() - started

    def tokens(self, text: str) -> list[int]:
        """The tokens of `text`."""
        return self.vocabulary.tokenize(text.encode(), False, True)

    def close(self) -> None:
        """Free the vocabulary's model."""
        import llama_cpp

        llama_cpp.llama_model_free(self.model)


def cases(maskbench: Path | None) -> list[dict]:
    """The schemas (with valid instances where known): MaskBench's sample, or `FIXED_SCHEMAS`."""
    if maskbench is None:
        return [{"schema": schema, "tests": []} for schema in FIXED_SCHEMAS]
    files = sorted(maskbench.glob("*.json"))
    random.Random(0).shuffle(files)
    return [json.loads(path.read_text()) for path in files[:MASKBENCH_SAMPLE]]


def checked_grammars(schemas: list[dict]) -> tuple[list[tuple[dict, str]], list[float], int]:
    """The cases whose schema passes the limits and compiles without a vocabulary, with that step's times."""
    from edge_server.dialects import constraints
    from edge_server.dialects.schemalimits import SchemaRefused

    constraints._validated.cache_clear()  # each schema compiled once here, as a first request would
    kept, times, refused = [], [], 0
    for case in schemas:
        started = time.perf_counter()
        try:
            grammar = constraints.schema_grammar(case["schema"], param="p")
        except SchemaRefused:
            refused += 1
            continue
        finally:
            times.append((time.perf_counter() - started) * 1000)
        kept.append((case, grammar))
    return kept, times, refused


def vocab_costs(vocab: LoadedVocab, grammars: list[tuple[dict, str]]) -> dict:
    """Matcher compile times for this vocabulary, and each step's mask (alone and applied to a logits row) along
    the valid instances' tokens."""
    from edge_server.dialects.constraints import GrammarError, compile_matcher
    from edge_server.engine.sampler import allowed_tokens, mask_buffer

    compile_ms, mask_ms, step_ms = [], [], []
    mask, logits = mask_buffer(vocab.n_vocab), np.zeros(vocab.n_vocab, dtype=np.float32)
    failed = 0
    for case, grammar in grammars:
        started = time.perf_counter()
        try:
            matcher = compile_matcher(vocab.tokenizer, grammar)
        except GrammarError:
            failed += 1
            continue
        compile_ms.append((time.perf_counter() - started) * 1000)
        for instance in case.get("tests", []):
            if not instance.get("valid"):
                continue
            walker = matcher.deep_copy()
            for token in vocab.tokens(json.dumps(instance["data"], separators=(",", ":"), ensure_ascii=False)):
                started = time.perf_counter()
                walker.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
                mask_ms.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                allowed = allowed_tokens(walker, mask, vocab.n_vocab)
                np.copyto(logits, -np.inf, where=~allowed)
                step_ms.append((time.perf_counter() - started) * 1000)
                if not walker.consume_token(token):
                    break
    return {"n_vocab": vocab.n_vocab, "tokenizer_build_s": vocab.tokenizer_s, "compile": percentiles(compile_ms),
            "compile_failed": failed, "mask": percentiles(mask_ms) if mask_ms else None,
            "mask_applied": percentiles(step_ms) if step_ms else None}


def fast_forward(vocab: LoadedVocab) -> dict:
    """Along a valid order (the ORDER_SCHEMA), the steps whose mask leaves one token, and the tokens and bytes
    llguidance's forced view would feed (`compute_ff_tokens`, which re-tokenizes the forced text)."""
    import llguidance

    from edge_server.dialects.constraints import compile_matcher, parser_limits, schema_grammar
    from edge_server.engine.sampler import mask_buffer

    order = {"customer_reference_number": 1234, "shipping_priority_level": "express", "line_items": [
        {"product_description": "lamp", "quantity_ordered": 1, "gift_wrapping_requested": False},
        {"product_description": "mug", "quantity_ordered": 3, "gift_wrapping_requested": True}]}
    tokens = vocab.tokens(json.dumps(order, separators=(",", ":")))
    grammar = schema_grammar(ORDER_SCHEMA, param="p")
    matcher = compile_matcher(vocab.tokenizer, grammar)  # the engine's: every token that spells allowed text
    # llguidance's default (forcing) view, where forced text has one canonical tokenization.
    forcing = llguidance.LLMatcher(vocab.tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar),
                                   log_level=0, limits=parser_limits())
    mask = mask_buffer(vocab.n_vocab)
    single, position, forced_until, forced_bytes = 0, 0, 0, 0
    for token in tokens:
        matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        if int(np.unpackbits(mask.view(np.uint8))[:vocab.n_vocab].sum()) == 1:
            single += 1
        # Bytes of the output known before they are sampled (each counted once, however often forced).
        end = position + len(forcing.compute_ff_bytes())
        forced_bytes += max(0, end - max(position, forced_until))
        forced_until = max(forced_until, end)
        position += len(vocab.tokenizer.decode_bytes([token]))
        matcher.consume_token(token)
        forcing.consume_token(token)
    return {"tokens": len(tokens), "bytes": position, "single_token_steps": single, "forced_bytes": forced_bytes}


def batch_saving(model: Path, *, threads: int, sizes: tuple[int, ...] = (1, 2, 4, 8), rounds: int = 8) -> dict:
    """Decode time per token when k tokens go in one batch, against k single-token steps (the 0.5B-shape model)."""
    import llama_cpp


    params = llama_cpp.llama_model_default_params()
    loaded = llama_cpp.llama_model_load_from_file(str(model).encode(), params)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_threads, cparams.n_threads_batch = 2048, 512, threads, threads
    context = llama_cpp.llama_init_from_model(loaded, cparams)
    batch = llama_cpp.llama_batch_init(64, 0, 1)
    try:
        def decode(tokens: list[int], position: int) -> float:
            batch.n_tokens = len(tokens)
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == len(tokens) - 1
            started = time.perf_counter()
            if llama_cpp.llama_decode(context, batch) != 0:
                raise SystemExit("llama_decode failed")
            return time.perf_counter() - started

        decode([1] * 32, 0)  # a prompt, then warm
        per_token: dict[int, float] = {}
        for size in sizes:
            position, times = 32, []
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(context), 0, 32, -1)
            for _ in range(rounds):
                times.append(decode([7] * size, position) / size)
                position += size
            per_token[size] = min(times) * 1000  # the least disturbed round
        return {"ms_per_token": per_token, "threads": threads}
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(context)
        llama_cpp.llama_model_free(loaded)


# ---- decode through the servers -------------------------------------------------------------------------------

def order_bodies(bias: dict[str, float], max_tokens: int, *, ours: bool) -> dict[str, dict]:
    """The plain and the constrained request: the same prompt, greedy, end of turn banned; for ours also the
    constrained one without fast-forward (`speculative: false`)."""
    plain = {"model": "bench", "messages": [{"role": "user", "content": ORDER_PROMPT}], "max_tokens": max_tokens,
             "temperature": 0.0, "logit_bias": bias,
             "chat_template_kwargs": {"enable_thinking": False}}  # Qwen3.5's template thinks first otherwise
    constrained = {**plain, "response_format": {"type": "json_schema", "json_schema": {"name": "order",
                                                                                         "schema": ORDER_SCHEMA}}}
    bodies = {"plain": plain, "constrained": constrained}
    return {**bodies, "constrained_no_ff": {**constrained, "speculative": False}} if ours else bodies


def forced_total(base_url: str) -> float:
    """Our server's count of fast-forwarded tokens (0 for a server without it)."""
    import re

    import requests

    found = re.search(r"^edge_forced_tokens_total (\S+)$", requests.get(base_url + "/metrics", timeout=10).text,
                      re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def decode_side(base_url: str, bodies: dict[str, dict]) -> dict:
    """Best (and median) decode-only and end-to-end tok/s of each body over `DECODE_RUNS` alternated runs (after a
    warm-up)."""
    from edge_server.devtools.bench import Stream

    for body in bodies.values():
        Stream(base_url, body).run()
    runs: dict[str, list[Stream]] = {name: [] for name in bodies}
    forced = {name: 0.0 for name in bodies}
    for _ in range(DECODE_RUNS):
        for name, body in bodies.items():
            before = forced_total(base_url) if "constrained_no_ff" in bodies else 0.0
            runs[name].append(Stream(base_url, body).run())
            forced[name] += (forced_total(base_url) - before) if "constrained_no_ff" in bodies else 0.0
    figures = {}
    for name, streams in runs.items():
        figures[name] = {
            "decode_tok_s": max(s.decode_rate for s in streams),
            "end_to_end_tok_s": max(s.usage["completion_tokens"] / (s.done - s.sent) for s in streams),
            "decode_tok_s_median": statistics.median(s.decode_rate for s in streams),
            "completion_tokens": statistics.median(s.usage["completion_tokens"] for s in streams),
            "forced_tokens": forced[name] / DECODE_RUNS,
            "sample": streams[-1].text[:160]}
    return figures


def decode_table(models: dict[str, Path], *, threads: int, max_tokens: int, out: Path, peer: Path | None) -> dict:
    """`decode_side` on ours and on llama-server for each model, servers started fresh with the same flags."""
    from edge_server.devtools.bench import end_of_turn_bias, load_vocab, start_peer

    results: dict[str, dict] = {}
    for label, model in models.items():
        bias = end_of_turn_bias(load_vocab(model))
        results[label] = {}
        for side in ("ours", "llama-server") if peer else ("ours",):
            bodies = order_bodies(bias, max_tokens, ours=side == "ours")
            print(f"structured decode: {label}, {side} ...", flush=True)
            port = free_port()
            if side == "ours":
                server = start_server(model, port=port, log_path=out / "structured-ours.log",
                                      flags=["--threads", str(threads), "--parallel", "1", "--n-ctx", "2048",
                                             "--flash-attn", "off"])
            else:
                server = start_peer(peer, model, port=port, threads=threads, parallel=1, n_ctx=2048,
                                    log_path=out / "structured-llama-server.log")
            try:
                results[label][side] = decode_side(f"http://127.0.0.1:{port}", bodies)
            finally:
                stop([server])
    return results


# ---- the whole measurement and its table ----------------------------------------------------------------------

def structured(*, threads: int, out: Path, peer: Path | None = None, maskbench: Path | None = None,
               max_tokens: int = 128) -> dict:
    """Every figure of the module's docstring."""
    from edge_server.devtools.assets import fetch
    from edge_server.devtools.bench import ensure_bench_model
    from edge_server.devtools.bench_multiturn import ensure_hybrid_bench_model

    bench_model, smollm2 = ensure_bench_model(), fetch("model:smollm2")
    schemas = cases(maskbench)
    grammars, check_ms, refused = checked_grammars(schemas)
    vocabs = {"SmolLM2 (49k)": smollm2, "Qwen2.5 (152k)": fetch("vocab:qwen2"), "Qwen3.5 (qwen35)": fetch("vocab:qwen35")}
    per_vocab, ff = {}, None
    for label, path in vocabs.items():
        print(f"structured: compile and per-step mask on {label} ...", flush=True)
        vocab = LoadedVocab(path)
        try:
            per_vocab[label] = vocab_costs(vocab, grammars)
            if ff is None:
                ff = fast_forward(vocab)
        finally:
            vocab.close()
    decode = decode_table({"0.5B shape (random weights, 152k vocab)": bench_model,
                           "Qwen3.5 0.8B shape (hybrid, random weights, 152k vocab)": ensure_hybrid_bench_model(),
                           "SmolLM2-135M": smollm2},
                          threads=threads, max_tokens=max_tokens, out=out, peer=peer)
    return {"threads": threads, "cores": os.cpu_count(), "max_tokens": max_tokens,
            "schemas": "MaskBench sample" if maskbench else "FIXED_SCHEMAS", "schemas_n": len(schemas),
            "schemas_refused": refused, "check": percentiles(check_ms), "vocabs": per_vocab, "fast_forward": ff,
            "batch": batch_saving(bench_model, threads=threads), "decode": decode, "peer": str(peer) if peer else None}


def markdown(results: dict) -> str:
    """The section for bench/results.md."""
    lines = [f"`make bench BENCH_ARGS=--structured-only` ({results['threads']} threads on {results['cores']} cores, "
             f"shared). One streamed greedy request, the same prompt and model, plain and with a JSON schema "
             f"(`ORDER_SCHEMA`: fixed keys, an enum, bounded numbers and strings, 20 items at least), end of turn "
             f"banned, {results['max_tokens']} tokens at most; the best of {DECODE_RUNS} alternated runs (medians in "
             "results-structured.json). *Decode only*: first token to last; *end to end*: request to `[DONE]`.", "",
             "| model | server | plain decode tok/s | JSON decode tok/s | ratio | plain end-to-end tok/s | "
             "JSON end-to-end tok/s | ratio | JSON without fast-forward: decode tok/s (ratio) | fast-forwarded tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model, sides in results["decode"].items():
        for side, figures in sides.items():
            plain, json_, slow = figures["plain"], figures["constrained"], figures.get("constrained_no_ff")
            no_ff = f"{slow['decode_tok_s']:.1f} ({slow['decode_tok_s'] / plain['decode_tok_s']:.2f})" if slow else "-"
            forced = f"{json_['forced_tokens']:.0f} of {json_['completion_tokens']:.0f}" if slow else "-"
            lines.append(f"| {model} | {side} | {plain['decode_tok_s']:.1f} | {json_['decode_tok_s']:.1f} | "
                         f"**{json_['decode_tok_s'] / plain['decode_tok_s']:.2f}** | {plain['end_to_end_tok_s']:.1f} | "
                         f"{json_['end_to_end_tok_s']:.1f} | {json_['end_to_end_tok_s'] / plain['end_to_end_tok_s']:.2f} "
                         f"| {no_ff} | {forced} |")
    check = results["check"]
    lines += ["", f"Constraint cost per step on the engine thread, walking the valid instances of the "
                  f"{results['schemas']} ({results['schemas_n']} schemas, {results['schemas_refused']} refused by "
                  f"the limits or llguidance): llguidance's mask alone, and the whole step (mask, unpacked, applied "
                  f"to the logits row). Compile: the limits check and vocabulary-free compile on the HTTP thread "
                  f"(p50 {check['p50_ms']:.2f} ms, p99 {check['p99_ms']:.2f} ms, max {check['max_ms']:.1f} ms over "
                  f"{check['n']}), then the matcher for the vocabulary.", "",
              "| vocabulary | tokens | mask p50 / p99 ms | step p50 / p99 ms | steps | matcher compile p50 / p99 / max ms "
              "| tokenizer build s |", "|---|---|---|---|---|---|---|"]
    for label, v in results["vocabs"].items():
        mask, step, comp = v["mask"], v["mask_applied"], v["compile"]
        lines.append(f"| {label} | {v['n_vocab']:,} | {mask['p50_ms']:.3f} / {mask['p99_ms']:.3f} | "
                     f"{step['p50_ms']:.3f} / {step['p99_ms']:.3f} | {mask['n']:,} | {comp['p50_ms']:.2f} / "
                     f"{comp['p99_ms']:.2f} / {comp['max_ms']:.1f} | {v['tokenizer_build_s']:.1f} |")
    ff, batch = results["fast_forward"], results["batch"]["ms_per_token"]
    lines += ["", f"Fast-forward, on a valid order ({ff['tokens']} tokens, {ff['bytes']} bytes on SmolLM2's "
                  f"vocabulary): {ff['single_token_steps']} steps leave exactly one token (feeding those without "
                  f"sampling is exact); llguidance's forced view knows {ff['forced_bytes']} of the bytes before they "
                  f"are sampled, but as its own tokenization of them, not the model's. Decode cost per "
                  f"token on the 0.5B-shape model when k tokens go in one batch: "
                  + ", ".join(f"k={k}: {ms:.1f} ms" for k, ms in batch.items()) + "."]
    return "\n".join(lines)


def main_structured(*, threads: int, out: Path, peer: Path | None, maskbench: Path | None, text: str) -> str:
    """Run, write results-structured.json and the section of results.md; returns the new results.md text."""
    from edge_server.devtools.bench import _replace_section

    results = structured(threads=threads, out=out, peer=peer, maskbench=maskbench)
    (out / "results-structured.json").write_text(json.dumps(results, indent=2) + "\n")
    section = markdown(results)
    print(section)
    return _replace_section(text, STRUCTURED_HEADING, section)

