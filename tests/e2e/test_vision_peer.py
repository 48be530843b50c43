"""Images through edge-server and through llama-server (built from the same vendored llama.cpp,
`devtools/peer.py`) on the same GGUF, projector and image files, one pair per projector family: the same
`usage.prompt_tokens` with one and with two images, and the same greedy answers (openai SDK on both)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai import OpenAI

from edge_server.devtools import assets, peer
from edge_server.devtools.harness import free_port
from tests.conftest import or_fail
from tests.e2e.conftest import ServerProcess, assert_same_greedy_answer
from tests.e2e.test_vision import QUESTION, data_url, image_message, noise

N_CTX = 4096
FIRST, SECOND = noise(1, (64, 48)), noise(2, (100, 100))


@dataclass(frozen=True)
class Pair:
    """A text model and its projector, and the tokens mtmd makes of FIRST (markers around the image included)."""

    model: Callable[[Path], Path]  # the tiny model's path -> this pair's text model
    projector: Callable[[], Path]
    first_image_tokens: int


PAIRS = {
    # LLaVA-style: a fixed 56x56 input, 16 tokens, no markers.
    "mlp": Pair(lambda tiny: tiny, assets.vision_projector, 16),
    # Qwen2.5-VL: 64x48 -> 112x84 (multiples of 28, at least 8 tokens) -> 4x3 tokens + <|vision_start|>, <|vision_end|>.
    "qwen2.5vl": Pair(lambda tiny: assets.qwen2vl_model(), assets.qwen25vl_projector, 12 + 2),
    # Qwen3.5 (qwen3vl_merger, 16-pixel patches): 64x48 -> 128x96 -> 4x3 tokens + the two markers.
    "qwen3.5": Pair(lambda tiny: assets.qwen35_model(), assets.qwen35_projector, 12 + 2),
    # Qwen3-VL: the same merger with a deepstack layer; each image row carries its deepstack features too.
    "qwen3-vl": Pair(lambda tiny: assets.qwen3vl_model(), assets.qwen3vl_projector, 12 + 2),
    # Gemma 3: every image resized to 224x224, 16x16 patches pooled 4x4 -> 16 tokens + <start_of_image>, <end_of_image>.
    "gemma3": Pair(lambda tiny: assets.gemma3_model(), assets.gemma3_projector, 16 + 2),
}
PAIR_PARAMS = list(PAIRS)


class LlamaServer(ServerProcess):
    """llama-server with a projector on a free port, its log captured to a file (readiness, log and stop as the
    edge-server process's: both answer GET /health 200 once loaded)."""

    def __init__(self, model: Path, projector: Path, log_dir: Path):  # another program: not ServerProcess's command
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"llama-server-{self.port}.log"
        self._log = self.log_path.open("wb")
        command = peer.command(model, port=self.port, threads=2, parallel=1, n_ctx=N_CTX,
                               extra=["--mmproj", str(projector)])
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def llama_server_binary() -> Path:
    """The cached llama-server; without it the module is skipped (`make test-peer` builds it and requires it)."""
    binary = peer.binary()
    if not binary.is_file():
        message = "llama-server is not built: `make test-peer` (or `python -m edge_server.devtools.peer build`) builds it"
        if os.environ.get("EDGE_REQUIRE_PEER"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


def _client(base_url: str) -> OpenAI:
    return OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=120)


def _once(start: Callable[[str], OpenAI]) -> Callable[[str], OpenAI]:
    """`start` called once per pair name; a failure to start is kept and raised again for that pair's other tests."""
    started: dict[str, OpenAI | BaseException] = {}

    def get(name: str) -> OpenAI:
        if name not in started:
            try:
                started[name] = start(name)
            except BaseException as error:  # pytest.fail's outcome included
                started[name] = error
        if isinstance(started[name], BaseException):
            raise started[name]
        return started[name]

    return get


@pytest.fixture(scope="module")
def pair_files(tiny_model) -> Callable[[str], tuple[Path, Path]]:
    """A pair's name -> (text model, projector), written once into the asset cache."""
    return lambda name: (or_fail(PAIRS[name].model, tiny_model), or_fail(PAIRS[name].projector))


@pytest.fixture(scope="module")
def theirs(llama_server_binary, pair_files, tmp_path_factory) -> Iterator[Callable[[str], OpenAI]]:
    """Factory: a pair's name -> the openai SDK on llama-server serving it (started once per module)."""
    log_dir = tmp_path_factory.mktemp("llama-server-logs")
    servers: list[LlamaServer] = []

    def start(name: str) -> OpenAI:
        servers.append(LlamaServer(*pair_files(name), log_dir))
        return _client(servers[-1].wait_ready().base_url)

    yield _once(start)
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def ours(start_server, pair_files) -> Callable[[str], OpenAI]:
    """Factory: a pair's name -> the openai SDK on edge-server serving it. Started from the test itself, so that a
    pair the engine refuses fails that test (its xfail) and no other."""
    def start(name: str) -> OpenAI:
        model, projector = pair_files(name)
        return _client(start_server("--model", str(model), "--mmproj", str(projector), "--parallel", "1",
                                    "--n-ctx", str(N_CTX)).base_url)

    return _once(start)


def ask(client: OpenAI, messages: list[dict]):
    """A greedy 16-token answer with its two likeliest tokens at each step; thinking off (Qwen3.5's template)."""
    return client.chat.completions.create(model="vision", messages=messages, temperature=0, max_tokens=16,
                                          logprobs=True, top_logprobs=2,
                                          extra_body={"chat_template_kwargs": {"enable_thinking": False}})


def greedy_tokens(completion) -> list[dict]:
    """The answer's logprobs entries, each token as its bytes (the servers may spell a partial UTF-8 piece apart)."""
    return [{"token": tuple(entry.bytes or entry.token.encode()), "logprob": entry.logprob,
             "top_logprobs": [{"logprob": top.logprob} for top in entry.top_logprobs]}
            for entry in completion.choices[0].logprobs.content]


TEXT_ONLY = [{"role": "user", "content": QUESTION}]
ONE_IMAGE = image_message(data_url(FIRST))
# Text between the images: llama-server fails ("Chunk not found", a 500) to cut its cached prompt between two adjacent
# images without markers (the mlp projector's) when the next prompt shares only the first.
TWO_IMAGES = [{"role": "user", "content": [*ONE_IMAGE[0]["content"], {"type": "text", "text": "And this one?"},
                                           {"type": "image_url", "image_url": {"url": data_url(SECOND)}}]}]


@pytest.mark.parametrize("name", PAIRS)
def test_llama_server_loads_each_pair_and_counts_its_image_tokens(theirs, name):
    """The writers' files are what llama.cpp itself loads: 200s, and the image tokens the pair documents."""
    client = theirs(name)
    text, one, two = (ask(client, messages) for messages in (TEXT_ONLY, ONE_IMAGE, TWO_IMAGES))
    assert one.usage.prompt_tokens - text.usage.prompt_tokens == PAIRS[name].first_image_tokens
    assert two.usage.prompt_tokens > one.usage.prompt_tokens + PAIRS[name].first_image_tokens
    assert one.choices[0].message.content != two.choices[0].message.content  # the second image changes the answer


@pytest.mark.parametrize("name", PAIR_PARAMS)
def test_image_tokens_count_as_llama_server_counts_them(ours, theirs, name):
    mine = ours(name)  # first: a pair the engine refuses fails here, before llama-server is asked
    counts = {label: (ask(mine, messages).usage.prompt_tokens, ask(theirs(name), messages).usage.prompt_tokens)
              for label, messages in (("text", TEXT_ONLY), ("one image", ONE_IMAGE), ("two images", TWO_IMAGES))}
    assert all(edge == llama for edge, llama in counts.values()), counts


@pytest.mark.parametrize("name", PAIR_PARAMS)
def test_greedy_image_answers_equal_llama_servers(ours, theirs, name):
    mine = ours(name)
    for messages in (ONE_IMAGE, TWO_IMAGES):
        edge, llama = ask(mine, messages), ask(theirs(name), messages)
        assert edge.usage.completion_tokens == llama.usage.completion_tokens == 16
        assert_same_greedy_answer(greedy_tokens(edge), greedy_tokens(llama))
