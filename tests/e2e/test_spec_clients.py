"""The client examples of Qwen's streaming docs (the spec), run as written against the real server.

Each example's source is kept below as the spec prints it (indentation restored). The only changes
made before running it are textual: "http://localhost:8000" becomes the test server's URL and, where a
test compares text, `temperature 0, seed 1, max_tokens 40` are added next to the example's `stream`
field. The comparison text is a non-streamed request with the same body; the random-weight model's
text is gibberish, but deterministic under those fields.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import requests

SPEC_URL = "http://localhost:8000"
SAMPLING = {"temperature": 0, "seed": 1, "max_tokens": 40}
JS_EXAMPLE = Path(__file__).resolve().parent / "js" / "spec_stream_chat.js"

# "Enabling Streaming"
ENABLING_STREAMING = """\
import requests
import json
url = "http://localhost:8000/v1/chat/completions"
data = {
    "model": "gpt-3.5-turbo",
    "messages": [
        {"role": "user", "content": "Count from 1 to 10"}
    ],
    "stream": True
}
response = requests.post(url, json=data, stream=True)
for line in response.iter_lines():
    if line:
        line = line.decode('utf-8')
        if line.startswith('data: '):
            data_str = line[6:]
            if data_str == '[DONE]':
                break
            chunk = json.loads(data_str)
            delta = chunk['choices'][0]['delta']
            if 'content' in delta:
                print(delta['content'], end='', flush=True)
"""

# "Python Client Examples" / "Basic Streaming"
BASIC_STREAMING = """\
import requests
import json

def stream_chat(messages):
    url = "http://localhost:8000/v1/chat/completions"
    response = requests.post(
        url,
        json={
            "model": "gpt-3.5-turbo",
            "messages": messages,
            "stream": True
        },
        stream=True
    )
    for line in response.iter_lines():
        if line:
            line = line.decode('utf-8')
            if line.startswith('data: '):
                data = line[6:]
                if data == '[DONE]':
                    print()  # New line at end
                    break
                chunk = json.loads(data)
                delta = chunk['choices'][0]['delta']
                if 'content' in delta:
                    print(delta['content'], end='', flush=True)

messages = [
    {"role": "user", "content": "Write a haiku about programming"}
]
stream_chat(messages)
"""

# "With OpenAI SDK" (openai < 1.0)
LEGACY_SDK_STREAMING = """\
import openai
openai.api_base = "http://localhost:8000/v1"
openai.api_key = "none"
response = openai.ChatCompletion.create(
    model="gpt-3.5-turbo",
    messages=[
        {"role": "user", "content": "Tell me a story"}
    ],
    stream=True
)
for chunk in response:
    delta = chunk.choices[0].delta
    if hasattr(delta, 'content'):
        print(delta.content, end='', flush=True)
print()  # New line
"""

# "Collecting Full Response"
COLLECTING_FULL_RESPONSE = """\
import requests
import json

def stream_and_collect(messages):
    url = "http://localhost:8000/v1/chat/completions"
    response = requests.post(
        url,
        json={
            "model": "gpt-3.5-turbo",
            "messages": messages,
            "stream": True
        },
        stream=True
    )
    full_response = ""
    for line in response.iter_lines():
        if line:
            line = line.decode('utf-8')
            if line.startswith('data: '):
                data = line[6:]
                if data == '[DONE]':
                    break
                chunk = json.loads(data)
                delta = chunk['choices'][0]['delta']
                if 'content' in delta:
                    content = delta['content']
                    full_response += content
                    print(content, end='', flush=True)
    print()  # New line
    return full_response

response = stream_and_collect([
    {"role": "user", "content": "Explain async programming"}
])
print(f"\\nFull response length: {len(response)} characters")
"""

# "Limitations" / "Function Calling Not Supported" (the snippet has no import of its own)
FUNCTION_CALLING_LIMITATION = """\
# This will return HTTP 400
response = requests.post(
    "http://localhost:8000/v1/chat/completions",
    json={
        "model": "gpt-3.5-turbo",
        "messages": [{"role": "user", "content": "Hello"}],
        "stream": True,
        "functions": [{"name": "test", "parameters": {}}]  # Not allowed
    }
)
"""

# "Best Practices" / "Buffer Management" (process_line is the caller's)
BUFFER_MANAGEMENT = """\
def stream_with_buffer(response):
    buffer = ""
    for chunk in response.iter_content(decode_unicode=True):
        buffer += chunk
        while '\\n' in buffer:
            line, buffer = buffer.split('\\n', 1)
            if line.startswith('data: '):
                process_line(line)
"""

# "Best Practices" / "Error Handling"
ERROR_HANDLING = """\
import requests
import json

def safe_stream(messages):
    try:
        response = requests.post(
            "http://localhost:8000/v1/chat/completions",
            json={
                "model": "gpt-3.5-turbo",
                "messages": messages,
                "stream": True
            },
            stream=True,
            timeout=30
        )
        response.raise_for_status()

        for line in response.iter_lines():
            if line:
                line = line.decode('utf-8')
                if line.startswith('data: '):
                    data = line[6:]
                    if data == '[DONE]':
                        break
                    try:
                        chunk = json.loads(data)
                        delta = chunk['choices'][0]['delta']
                        if 'content' in delta:
                            yield delta['content']
                    except json.JSONDecodeError:
                        print(f"Warning: Invalid JSON: {data}")
                        continue
    except requests.exceptions.RequestException as e:
        print(f"Error: {e}")
        return

for content in safe_stream([{"role": "user", "content": "Hello"}]):
    print(content, end='', flush=True)
"""


# ---------------------------------------------------------------------------------------- helpers

def adapt(source: str, base_url: str, anchor: str | None = None, extra: str = "") -> str:
    """The example with the test server's URL, and `extra` appended once right after `anchor`."""
    code = source.replace(SPEC_URL, base_url)
    if anchor is not None:
        assert code.count(anchor) == 1, f"{anchor!r} should occur once in the example"
        code = code.replace(anchor, anchor + extra)
    return code


PY_FIELDS = ("\"stream\": True", "".join(f", {json.dumps(k)}: {v!r}" for k, v in SAMPLING.items()))


def run_example(source: str, base_url: str, name: str, sampled: bool = True, **names) -> dict:
    """Exec a Python example (URL swapped, SAMPLING added to its body when `sampled`); its namespace."""
    code = adapt(source, base_url, *PY_FIELDS) if sampled else adapt(source, base_url)
    namespace = {"__name__": "__spec_example__", **names}
    exec(compile(code, f"<spec example: {name}>", "exec"), namespace)
    return namespace


def reference_text(base_url: str, content: str) -> str:
    """The non-streamed answer to the examples' body for `content`, with SAMPLING."""
    body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": content}], **SAMPLING}
    response = requests.post(base_url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "length"  # the random model never ends its turn within 40 tokens
    assert choice["message"]["content"].strip()
    return choice["message"]["content"]


class Wire:
    """What `requests.post` sent back to an example, line by line as the example read it."""

    def __init__(self) -> None:
        self.responses: list[requests.Response] = []
        self.lines: list[bytes] = []

    def data(self) -> list[str]:
        """The `data:` payloads the example read, decoded."""
        return [line[6:].decode("utf-8") for line in self.lines if line.startswith(b"data: ")]

    def content(self) -> str:
        """The content deltas of the chunks the example read, joined."""
        chunks = [json.loads(d) for d in self.data() if d != "[DONE]"]
        return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


@contextlib.contextmanager
def recorded_posts():
    """Patch `requests.post` so every line an example reads through `iter_lines` is recorded."""
    wire = Wire()
    real_post = requests.post

    def post(*args, **kwargs):
        response = real_post(*args, **kwargs)
        wire.responses.append(response)
        real_iter_lines = response.iter_lines

        def iter_lines(*a, **kw):
            for line in real_iter_lines(*a, **kw):
                wire.lines.append(line)
                yield line

        response.iter_lines = iter_lines
        return response

    with mock.patch.object(requests, "post", post):
        yield wire


def assert_stream_ended_at_done(wire: Wire) -> None:
    """One SSE stream was read, with 200 and text/event-stream, and `[DONE]` was its last data line."""
    assert len(wire.responses) == 1
    response = wire.responses[0]
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    data = wire.data()
    assert data and data[-1] == "[DONE]" and data.count("[DONE]") == 1, data[-3:]
    finishes = [c["choices"][0]["finish_reason"] for c in map(json.loads, data[:-1]) if c["choices"]]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])


# ------------------------------------------------------------------------------- requests examples

def test_enabling_streaming_snippet_run_verbatim_prints_every_delta_and_breaks_at_done(base_url, capsys):
    # No sampling fields at all: default temperature, no max_tokens (runs to the end of the context).
    with recorded_posts() as wire:
        namespace = run_example(ENABLING_STREAMING, base_url, "Enabling Streaming", sampled=False)
    printed = capsys.readouterr().out
    assert namespace["data_str"] == "[DONE]" and namespace["line"] == "data: [DONE]"  # left by its break
    assert_stream_ended_at_done(wire)
    assert printed == wire.content() and printed


def test_stream_chat_prints_the_non_streamed_text_and_a_newline_at_done(base_url, capsys):
    expected = reference_text(base_url, "Write a haiku about programming")
    with recorded_posts() as wire:
        run_example(BASIC_STREAMING, base_url, "Basic Streaming")
    assert capsys.readouterr().out == expected + "\n"  # the newline is printed only on [DONE]
    assert_stream_ended_at_done(wire)


def test_stream_and_collect_returns_and_prints_the_non_streamed_text(base_url, capsys):
    expected = reference_text(base_url, "Explain async programming")
    with recorded_posts() as wire:
        namespace = run_example(COLLECTING_FULL_RESPONSE, base_url, "Collecting Full Response")
    assert namespace["response"] == expected
    assert capsys.readouterr().out == f"{expected}\n\nFull response length: {len(expected)} characters\n"
    assert_stream_ended_at_done(wire)


def test_safe_stream_yields_the_non_streamed_text_without_warnings(base_url, capsys):
    expected = reference_text(base_url, "Hello")
    with recorded_posts() as wire:
        run_example(ERROR_HANDLING, base_url, "Error Handling")
    printed = capsys.readouterr().out
    assert "Warning: Invalid JSON" not in printed and "Error:" not in printed
    assert printed == expected
    assert_stream_ended_at_done(wire)


def test_safe_stream_reports_invalid_messages_as_a_400_before_streaming(base_url, capsys):
    namespace = run_example(ERROR_HANDLING, base_url, "Error Handling")
    capsys.readouterr()
    yielded = list(namespace["safe_stream"]([{"role": "bogus", "content": "Hello"}]))
    printed = capsys.readouterr().out
    assert yielded == []
    assert printed.startswith("Error: 400 Client Error") and base_url in printed, printed


def test_stream_with_buffer_reads_utf8_lines_that_join_to_the_non_streamed_text(base_url):
    expected = reference_text(base_url, "Count from 1 to 10")
    lines: list[str] = []
    namespace = run_example(BUFFER_MANAGEMENT, base_url, "Buffer Management", sampled=False,
                            process_line=lines.append)
    body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Count from 1 to 10"}],
            "stream": True, **SAMPLING}
    with requests.post(base_url + "/v1/chat/completions", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200
        assert response.encoding.lower() == "utf-8"  # else iter_content(decode_unicode=True) yields bytes
        namespace["stream_with_buffer"](response)
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1
    assert not any(line.endswith("\r") for line in lines)  # "\n" line ends, as the example splits on
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected


# --------------------------------------------------------------------------- legacy SDK (openai<1)

@pytest.fixture(scope="session")
def legacy_python(tmp_path_factory) -> Path:
    """A throwaway venv with openai==0.28.1 (pip must reach PyPI: no network fails, never skips)."""
    venv = tmp_path_factory.mktemp("legacy-openai") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          "openai==0.28.1"], capture_output=True, text=True, timeout=300)
    if pip.returncode != 0:
        pytest.fail(f"pip install openai==0.28.1 failed ({pip.returncode}):\n{pip.stdout}\n{pip.stderr}")
    return python


def run_script(argv: list[str], path: Path, code: str) -> subprocess.CompletedProcess:
    path.write_text(code, encoding="utf-8")
    return subprocess.run([*argv, str(path)], capture_output=True, encoding="utf-8", timeout=60,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def test_legacy_sdk_stream_example_prints_the_non_streamed_text(base_url, legacy_python, tmp_path):
    expected = reference_text(base_url, "Tell me a story")
    extra = "".join(f", {k}={v!r}" for k, v in SAMPLING.items())
    code = adapt(LEGACY_SDK_STREAMING, base_url, "stream=True", extra)
    result = run_script([str(legacy_python)], tmp_path / "legacy_stream.py", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"  # a null content would print "None"


LEGACY_SDK_WHOLE_AND_MODELS = """\
import json
import openai
openai.api_base = "http://localhost:8000/v1"
openai.api_key = "none"
answer = openai.ChatCompletion.create(
    model="gpt-3.5-turbo",
    messages=[{"role": "user", "content": "Tell me a story"}],
    temperature=0, seed=1, max_tokens=40,
)
models = openai.Model.list()
model = openai.Model.retrieve(models.data[0].id)
print(json.dumps({"answer": answer.to_dict_recursive(), "models": models.to_dict_recursive(),
                  "model": model.to_dict_recursive(), "content": answer.choices[0].message.content}))
"""


def test_legacy_sdk_non_streamed_answer_and_model_list(base_url, legacy_python, tmp_path, tiny_model):
    expected = reference_text(base_url, "Tell me a story")
    result = run_script([str(legacy_python)], tmp_path / "legacy_whole.py",
                        adapt(LEGACY_SDK_WHOLE_AND_MODELS, base_url))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["content"] == expected
    answer = out["answer"]
    assert answer["object"] == "chat.completion" and answer["model"] == "gpt-3.5-turbo"
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["completion_tokens"] == 40
    assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + 40
    assert out["models"]["object"] == "list"
    assert [m["id"] for m in out["models"]["data"]] == [tiny_model.stem]
    assert out["model"]["id"] == tiny_model.stem and out["model"]["object"] == "model"


# ---------------------------------------------------------------------------------- JavaScript/node

def test_javascript_fetch_example_prints_the_text_the_python_client_got(base_url, tmp_path):
    expected = reference_text(base_url, "Write a poem about AI")
    extra = "".join(f" {k}: {json.dumps(v)}," for k, v in SAMPLING.items())
    code = adapt(JS_EXAMPLE.read_text(encoding="utf-8"), base_url, "stream: true,", extra)
    # Exit once streamChat resolves (non-zero if it rejects), whatever the connection does after.
    call = "\nstreamChat(["
    assert code.count(call) == 1
    code = code.replace(call, "\nconst finished = streamChat([") + (
        "\nfinished.then(() => process.exit(0), (err) => { console.error(err); process.exit(1); });\n")
    result = run_script(["node"], tmp_path / "stream_chat.js", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected


# ------------------------------------------------------------------------------- function calling

def test_functions_in_a_stream_request_are_not_a_server_error(base_url):
    namespace = run_example(FUNCTION_CALLING_LIMITATION, base_url, "Function Calling Not Supported",
                            requests=requests)
    response = namespace["response"]
    assert response.status_code < 500, response.text
    if response.status_code == 200:  # served as a normal stream
        assert response.headers["Content-Type"].startswith("text/event-stream")
        data = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls", "function_call")
    else:  # refused as bad input, in the server's error format
        assert response.status_code == 400
        assert response.json()["error"]["message"]
