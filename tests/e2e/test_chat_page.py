"""The chat page at `/`, driven in real headless Chromium (Debian's, via node playwright-core) against real servers.

One node run (tests/e2e/browser/chat_page.js) goes through every scenario and reports what it saw as JSON;
the tests below each check one part of it, plus what the servers logged. Chromium and playwright-core are
installed on first use; an install that fails makes the tests FAIL with the installer's message.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import ROOT, SCRIPT_TEXT
from tests.e2e.test_vision import IMAGE_TOKENS, noise

pytestmark = pytest.mark.e2e

BROWSER_DIR = ROOT / "tests" / "e2e" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
API_KEY = "chat-page-test-key"
SYSTEM_PROMPT = "You are a terse assistant."  # what chat_page.js types into the page


class Once:
    """Runs `make` on the first call, inside the calling test, so that a failure FAILS that test (rather than
    erroring at setup) and every later test that needs it fails with the same message."""

    def __init__(self, make: Callable[[], Any]):
        self._make = make
        self._ran = False
        self._value: Any = None
        self._failure: str | None = None

    def __call__(self) -> Any:
        if not self._ran:
            self._ran = True
            try:
                self._value = self._make()
            except pytest.fail.Exception as failure:
                self._failure = str(failure)
        if self._failure is not None:
            pytest.fail(self._failure, pytrace=False)
        return self._value


def _install(command: list[str], *, cwd: Path | None = None, timeout: float = 900) -> None:
    """Run one installer command; fail with its own output when it does not succeed."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.fail(f"installing the browser test tools: `{' '.join(command)}` failed: {error}", pytrace=False)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()[-4000:]
        pytest.fail(f"installing the browser test tools: `{' '.join(command)}` exited {done.returncode}:\n{output}",
                    pytrace=False)


def _install_browser() -> str:
    """Debian's chromium and playwright-core (into tests/e2e/browser/node_modules) if missing; returns node."""
    if not CHROMIUM.exists():
        if shutil.which("apt-get") is None:
            pytest.fail(f"{CHROMIUM} is missing and there is no apt-get to install Debian's chromium", pytrace=False)
        _install(["apt-get", "update"])
        _install(["apt-get", "install", "-y", "--no-install-recommends", "chromium"])
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are needed to drive Chromium (playwright-core)", pytrace=False)
    if not (BROWSER_DIR / "node_modules" / "playwright-core" / "package.json").is_file():
        _install([npm, "install", "--no-audit", "--no-fund", "--no-package-lock"], cwd=BROWSER_DIR)
    return node


@pytest.fixture(scope="session")
def chromium_driver() -> Once:
    """Calling it installs (once per session) what driving Chromium needs and returns the node binary."""
    return Once(_install_browser)


@pytest.fixture(scope="module")
def page_servers(start_server, scripted_model, slow_model, tmp_path_factory, request) -> Once:
    """Calling it starts (once) the servers the page is tried on, side by side (and the session's vision server,
    which later modules share)."""

    def start():
        # The random "slow" model never stops by itself (~200 tokens/s here; the tiny one would reach the end
        # of its context in about 2 s, too soon to click Stop reliably).
        servers = {
            "scripted": start_server("--model", str(scripted_model), wait=False),
            "endless": start_server("--model", str(slow_model), "--api-key", API_KEY, wait=False),
            "demo": start_server("--models-dir", str(tmp_path_factory.mktemp("no-models")), wait=False),
        }
        servers["vision"] = request.getfixturevalue("vision_server")  # loads while the others do
        for server in servers.values():
            server.wait_ready()
        return servers

    return Once(start)


@pytest.fixture(scope="module")
def browser_run(chromium_driver, page_servers, tmp_path_factory) -> Once:
    """Calling it runs chat_page.js once and returns its observations (plus the servers and the output dir)."""

    def run() -> dict:
        node = chromium_driver()
        servers = page_servers()
        out_dir = tmp_path_factory.mktemp("chat-page")
        image = out_dir / "picture.png"
        noise(41, (40, 30)).save(image, "PNG")
        config = {"scripted": servers["scripted"].base_url, "tiny": servers["endless"].base_url, "apiKey": API_KEY,
                  "demo": servers["demo"].base_url, "vision": servers["vision"].base_url, "imagePath": str(image),
                  "userDataDir": str(out_dir / "profile"), "outDir": str(out_dir)}
        started = time.monotonic()
        try:
            done = subprocess.run([node, str(BROWSER_DIR / "chat_page.js"), json.dumps(config)], cwd=BROWSER_DIR,
                                  capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as error:
            pytest.fail(f"chat_page.js did not finish: {error}\n{error.stderr}", pytrace=False)
        lines = done.stdout.strip().splitlines()
        try:
            result = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            pytest.fail(f"chat_page.js exited {done.returncode} without its JSON:\n{done.stdout}\n{done.stderr}",
                        pytrace=False)
        (out_dir / "result.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
        if done.returncode != 0 or result.get("fatal"):
            pytest.fail(f"chat_page.js failed in {result.get('fatal')}\nstderr: {done.stderr[-3000:]}\n"
                        f"screenshots in {out_dir}", pytrace=False)
        print(f"browser run: {time.monotonic() - started:.1f}s, screenshots and result.json in {out_dir}")
        return {**result, "servers": servers, "out_dir": out_dir}

    return Once(run)


def _access_lines(log: str, route: str = "/v1/chat/completions") -> list[str]:
    return [line for line in log.splitlines() if "edge_server.access" in line and f" {route} " in line]


def _console_errors(run: dict, *phases: str) -> list[dict]:
    return [entry for entry in run["consoleErrors"] if entry["phase"] in phases]


# ---- the page as served ------------------------------------------------------------------------------------

def test_page_is_served_as_one_self_contained_file(page_servers):
    servers = page_servers()
    response = requests.get(servers["scripted"].base_url + "/", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    assert "connect-src 'self'" in response.headers["Content-Security-Policy"]
    html = response.text
    assert html.startswith("<!doctype html>") and "<style>" in html and "<script>" in html
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:)""", html), "the page must not load other files"
    assert "://" not in html, "no CDN, no external fonts: the page works offline"
    assert "innerHTML" not in html, "model text is rendered as text, never as HTML"
    # Revalidation: the same bytes answer 304 to their ETag.
    again = requests.get(servers["scripted"].base_url + "/", headers={"If-None-Match": response.headers["ETag"]},
                         timeout=10)
    assert again.status_code == 304
    # The page itself needs no key on a protected server (only /v1/* does).
    assert requests.get(servers["endless"].base_url + "/", timeout=10).status_code == 200


# ---- in Chromium ---------------------------------------------------------------------------------------------

def test_page_loads_without_console_errors_and_shows_the_model(browser_run):
    run = browser_run()
    assert run["pageErrors"] == []
    assert _console_errors(run, "load", "chat", "history", "stop", "demo", "vision") == []
    assert run["modelShown"] == "scripted"
    assert run["warningHiddenOnRealModel"] is True
    assert run["pageHeaders"]["content-type"] == "text/html; charset=utf-8"
    urls = {server.base_url for server in run["servers"].values()}
    foreign = [url for url in run["requests"] if not any(url.startswith(base + "/") for base in urls)]
    assert foreign == [], "the page only talks to its own server"
    assert (run["out_dir"] / "chat.png").read_bytes().startswith(b"\x89PNG")


def test_enter_streams_the_reply_into_the_page(browser_run):
    run = browser_run()
    first = run["first"]
    assert first["text"] == SCRIPT_TEXT
    request = first["request"]
    assert request["stream"] is True and request["stream_options"] == {"include_usage": True}
    assert request["temperature"] == 0 and request["model"] == "scripted"
    assert request["messages"] == [{"role": "system", "content": SYSTEM_PROMPT},
                                   {"role": "user", "content": "Hello there"}]
    # The text node went through partial states, each a prefix of the reply: it was rendered as it arrived.
    states = first["states"]
    assert all(SCRIPT_TEXT.startswith(state) for state in states), states
    partial = [state for state in states if 0 < len(state) < len(SCRIPT_TEXT)]
    assert len(partial) >= 5, states
    assert run["promptFocusedAfterReply"] == "prompt"


def test_second_message_sends_the_whole_history(browser_run):
    run = browser_run()
    second = run["second"]
    assert second["text"] == SCRIPT_TEXT
    assert second["request"]["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": SCRIPT_TEXT},
        {"role": "user", "content": "Say it again"},
    ]
    assert run["bubbles"] == ["msg user", "msg assistant", "msg user", "msg assistant"]
    # And the server saw it: the second prompt is the first one plus two turns.
    lines = [line for line in _access_lines(run["servers"]["scripted"].log()) if " 200 " in line]
    prompts = [int(re.search(r" prompt=(\d+) ", line).group(1)) for line in lines]
    assert len(prompts) == 2 and prompts[1] > prompts[0] + 10, lines


def test_tokens_per_second_is_shown_after_each_reply(browser_run):
    run = browser_run()
    lines = [line for line in _access_lines(run["servers"]["scripted"].log()) if " 200 " in line]
    completions = [int(re.search(r" completion=(\d+) ", line).group(1)) for line in lines]
    for reply, completion in zip((run["first"], run["second"]), completions, strict=True):
        match = re.fullmatch(r"(\d+) tokens in ([\d.]+) s · ([\d.]+) tok/s", reply["meta"])
        assert match, reply["meta"]
        assert int(match.group(1)) == completion  # the usage chunk's count, not a guess
        assert reply["tokensPerSecond"] > 0 and float(match.group(3)) > 0


def test_stop_aborts_the_stream_and_the_server_stops_generating(browser_run):
    run = browser_run()
    stop = run["stop"]
    assert stop["stateWhileStreaming"] == "streaming"
    assert 0 < stop["early"] < stop["later"], stop  # text kept arriving while we watched
    assert stop["uiIdleMs"] < 2000 and stop["stopDisabled"] and stop["sendEnabled"], stop
    assert stop["health"]["running"] == 0 and stop["health"]["queued"] == 0, stop
    assert stop["serverIdleMs"] < 2000, stop
    assert stop["meta"].endswith("· stopped") and stop["finalLength"] >= stop["later"], stop
    server = run["servers"]["endless"]
    deadline = time.monotonic() + 5
    while not any("finish=cancelled" in line for line in _access_lines(server.log())):
        assert time.monotonic() < deadline, _access_lines(server.log())
        time.sleep(0.05)
    assert (run["out_dir"] / "stopped.png").is_file()


def test_api_key_field_unlocks_a_protected_server(browser_run):
    run = browser_run()
    assert run["withoutKey"].startswith("Missing or wrong API key")
    assert run["tinyModelShown"] == "slow"
    # Only the 401 of /v1/models before the key was typed reached the console.
    assert all(" 401 " in entry["text"] for entry in _console_errors(run, "api-key")), run["consoleErrors"]


def test_server_error_message_is_shown(browser_run):
    run = browser_run()
    error = run["error"]
    assert error["request"]["temperature"] == 5
    answer = requests.post(run["servers"]["scripted"].base_url + "/v1/chat/completions", json=error["request"],
                           timeout=10)
    assert answer.status_code == 400
    assert error["shown"] == answer.json()["error"]["message"]
    assert "temperature" in error["shown"]
    assert error["promptRestored"] == "Too hot"  # the message is handed back to retry
    assert all(" 400 " in entry["text"] for entry in _console_errors(run, "error")), run["consoleErrors"]


def test_demo_model_warning_is_shown_prominently(browser_run):
    run = browser_run()
    demo = run["demo"]
    assert demo["model"] == "edge-server-demo"
    assert demo["warningVisible"] is True and demo["warning"].startswith("OFFLINE DEMO MODEL")


def test_an_image_is_attached_by_picker_and_paste_shown_and_sent_as_a_data_url(browser_run):
    run = browser_run()
    vision = run["vision"]
    assert run["attachHiddenOnTextModel"] is True and vision["attachVisible"] is True
    assert vision["pastedText"] == ""  # the paste attached the image instead of typing its name
    picture = base64.b64encode((run["out_dir"] / "picture.png").read_bytes()).decode()
    first = vision["first"]["request"]["messages"]
    image_part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + picture}}
    assert first == [{"role": "user", "content": [{"type": "text", "text": "What is in these pictures?"},
                                                  image_part, image_part]}]
    assert vision["attachmentsAfterSend"] == 0
    # The history keeps the images: the second request sends them again, and each user bubble shows its own.
    second = vision["second"]["request"]["messages"]
    assert second[:2] == [first[0], {"role": "assistant", "content": vision["first"]["text"]}]
    assert second[2] == {"role": "user", "content": "And now?"}
    assert vision["thumbnails"] == [[40, 40], []]
    # The server saw both images: the same request, not streamed, costs two images' tokens more than its text.
    base = run["servers"]["vision"].base_url
    body = {**vision["first"]["request"], "stream": False}
    body.pop("stream_options")
    answer = requests.post(base + "/v1/chat/completions", json=body, timeout=30).json()
    text_only = requests.post(base + "/v1/chat/completions", timeout=30, json={**body, "messages": [
        {"role": "user", "content": "What is in these pictures?"}]}).json()
    assert answer["usage"]["prompt_tokens"] == text_only["usage"]["prompt_tokens"] + 2 * IMAGE_TOKENS
    assert answer["choices"][0]["message"]["content"] == vision["first"]["text"]
