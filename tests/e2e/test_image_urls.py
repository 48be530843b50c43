"""Remote image URLs: refused by default, and with --allow-image-urls fetched only from allowed addresses, within
the byte and time limits. An HTTP server of the test on 127.0.0.2 serves the images; the fetching server allows
exactly that address through its test-only EDGE_IMAGE_URL_NETWORKS, so every other loopback address (127.0.0.1,
localhost) is still refused by the production check. HTTPS servers on the same address hold certificates of a test
CA (trustme) that the fetching server trusts through SSL_CERT_FILE, as it would a system CA."""

from __future__ import annotations

import io
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anthropic
import openai
import pytest
import trustme
from openai import OpenAI

from edge_server.devtools import assets
from tests.e2e.test_vision import image_message, noise

pytestmark = pytest.mark.e2e
IMAGE = noise(31)
TIMEOUT = 1.5  # the fetching server's --image-url-timeout


def _png() -> bytes:
    buffer = io.BytesIO()
    IMAGE.save(buffer, "PNG")
    return buffer.getvalue()


class _Images(BaseHTTPRequestHandler):
    """/cat.png, redirects (to itself, to 127.0.0.1), a body past 8 MiB without a length, a slow body."""

    png = _png()
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append(self.path)
        host, port = self.server.server_address[:2]
        if self.path == "/cat.png":
            self._send(200, self.png, {"Content-Type": "image/png", "Content-Length": str(len(self.png))})
        elif self.path == "/octet":
            self._send(200, self.png, {"Content-Type": "application/octet-stream"})
        elif self.path == "/moved":
            self._send(302, b"", {"Location": "/cat.png", "Content-Length": "0"})
        elif self.path == "/to-loopback":
            self._send(302, b"", {"Location": f"http://127.0.0.1:{port}/cat.png", "Content-Length": "0"})
        elif self.path == "/huge":  # no Content-Length: only counting the bytes read can stop it
            self._send(200, None, {"Content-Type": "image/png"})
            chunk = b"\0" * (1 << 20)
            try:
                for _ in range(64):
                    self.wfile.write(chunk)
            except OSError:
                pass  # the fetcher hung up: what the test wants
        elif self.path == "/slow":
            self._send(200, None, {"Content-Type": "image/png", "Content-Length": str(len(self.png))})
            try:
                for byte in self.png[:40]:  # a byte every 0.1 s: each read is quick, the whole is not
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        elif self.path == "/slowish":  # whole after 0.8 s: within the time limit alone, not twice
            self._send(200, None, {"Content-Type": "image/png", "Content-Length": str(len(self.png))})
            half = len(self.png) // 2
            try:
                self.wfile.write(self.png[:half])
                self.wfile.flush()
                time.sleep(0.8)
                self.wfile.write(self.png[half:])
            except OSError:
                pass
        else:
            self._send(404, b"", {"Content-Length": "0"})

    def _send(self, status: int, body: bytes | None, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, *args) -> None:
        """Quiet."""


def _serve(tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """An image server on 127.0.0.2 (its base URL), over TLS with `tls`."""
    server = ThreadingHTTPServer(("127.0.0.2", 0), _Images)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"{'https' if tls else 'http'}://127.0.0.2:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _tls(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    """A server context with a certificate from `ca` for `names`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """The test's image server on 127.0.0.2 (base URL)."""
    yield from _serve()


@pytest.fixture(scope="module")
def trusted_ca(tmp_path_factory) -> tuple[trustme.CA, str]:
    """A test CA and its certificate's file, which the fetching server trusts."""
    ca = trustme.CA()
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, str(path)


@pytest.fixture(scope="module")
def tls_hosts(trusted_ca) -> Iterator[dict[str, str]]:
    """HTTPS image servers on 127.0.0.2: with a trusted certificate for that address, with one for another
    name, and with one from a CA nobody trusts."""
    ca = trusted_ca[0]
    servers = {"trusted": _serve(_tls(ca, "127.0.0.2")), "other name": _serve(_tls(ca, "images.example")),
               "unknown CA": _serve(_tls(trustme.CA(), "127.0.0.2"))}
    yield {name: next(server) for name, server in servers.items()}
    for server in servers.values():
        next(server, None)


@pytest.fixture(scope="module")
def fetching(start_server, tiny_model, trusted_ca) -> OpenAI:
    """A vision server with --allow-image-urls that may also reach 127.0.0.2 (the test's image servers) and
    trusts the test CA."""
    server = start_server("--model", str(tiny_model), "--mmproj", str(assets.vision_projector()),
                          "--allow-image-urls", "--image-url-timeout", str(TIMEOUT),
                          env={"EDGE_IMAGE_URL_NETWORKS": "127.0.0.2/32", "SSL_CERT_FILE": trusted_ca[1]})
    return OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=60)


def ask(client: OpenAI, *urls: str):
    """A greedy chat answer about the images at `urls`."""
    return client.chat.completions.create(model="tiny-test", messages=image_message(*urls), temperature=0,
                                          max_tokens=8)


def refusal(client: OpenAI, *urls: str) -> dict:
    """The 400's error object for images at `urls`, naming the last one."""
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, *urls)
    assert refused.value.body["param"] == f"messages[0].content[{len(urls)}].image_url", refused.value.body
    return refused.value.body


def test_urls_are_refused_by_default_saying_how_to_allow_them(vision_server, image_host):
    client = OpenAI(base_url=vision_server.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
    error = refusal(client, image_host + "/cat.png")
    assert error["code"] == "image_url_refused" and "--allow-image-urls" in error["message"]
    claude = anthropic.Anthropic(base_url=vision_server.base_url, api_key="none", max_retries=0, timeout=60)
    with pytest.raises(anthropic.BadRequestError, match="--allow-image-urls"):
        claude.messages.create(model="tiny-test", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": image_host + "/cat.png"}}]}])


def test_an_allowed_url_is_fetched_and_answers_as_the_same_image_inline(fetching, image_host):
    from tests.e2e.test_vision import data_url

    inline = ask(fetching, data_url(IMAGE))
    for path in ("/cat.png", "/octet", "/moved"):  # typed, untyped (the bytes decide), after a redirect
        fetched = ask(fetching, image_host + path)
        assert fetched.choices[0].message.content == inline.choices[0].message.content, path
        assert fetched.usage.prompt_tokens == inline.usage.prompt_tokens
        assert fetched.usage.prompt_tokens_details.cached_tokens == inline.usage.prompt_tokens - 1  # the same image
    anthropic_client = anthropic.Anthropic(base_url=str(fetching.base_url).removesuffix("/v1/"), api_key="none",
                                           max_retries=0, timeout=60)
    message = anthropic_client.messages.create(model="tiny-test", max_tokens=8, extra_body={"temperature": 0},
                                               messages=[{"role": "user", "content": [
                                                   {"type": "text", "text": "What is in this picture?"},
                                                   {"type": "image", "source": {"type": "url",
                                                                                "url": image_host + "/cat.png"}}]}])
    assert message.content[0].text == inline.choices[0].message.content


def test_loopback_private_and_redirected_addresses_are_refused(fetching, image_host):
    port = image_host.rsplit(":", 1)[1]
    for url in (f"http://127.0.0.1:{port}/cat.png", f"http://localhost:{port}/cat.png", "http://[::1]/cat.png",
                "http://10.0.0.1/cat.png", "http://169.254.169.254/latest/meta-data", "http://0.0.0.0/cat.png",
                "http://[::ffff:127.0.0.1]/cat.png"):
        error = refusal(fetching, url)
        assert error["code"] == "image_url_refused" and "not a public address" in error["message"], (url, error)
    _Images.seen.clear()
    error = refusal(fetching, image_host + "/to-loopback")
    assert error["code"] == "image_url_refused" and "127.0.0.1" in error["message"]
    assert _Images.seen == ["/to-loopback"]  # the redirect was checked before any connection to its target
    for url in ("file:///etc/passwd", "ftp://example.com/cat.png", "gopher://127.0.0.2/"):
        assert refusal(fetching, url)["code"] == "invalid_image", url


def test_an_oversize_body_is_cut_off_and_a_slow_server_timed_out(fetching, image_host):
    error = refusal(fetching, image_host + "/huge")
    assert error["code"] == "image_too_large" and str(8 << 20) in error["message"]
    started = time.monotonic()
    error = refusal(fetching, image_host + "/slow")
    assert error["code"] == "image_url_timeout" and "--image-url-timeout" in error["message"]
    assert time.monotonic() - started < TIMEOUT + 1.5
    assert ask(fetching, image_host + "/slowish").choices  # one slowish image is in time...
    started = time.monotonic()
    error = refusal(fetching, image_host + "/slowish", image_host + "/slowish")  # ...two are not: one limit for all
    assert error["code"] == "image_url_timeout" and time.monotonic() - started < TIMEOUT + 1.5
    assert ask(fetching, image_host + "/cat.png").choices  # the server is still well


def test_https_is_fetched_only_from_a_server_whose_certificate_names_the_host(fetching, tls_hosts):
    from tests.e2e.test_vision import data_url

    inline = ask(fetching, data_url(IMAGE))
    fetched = ask(fetching, tls_hosts["trusted"] + "/cat.png")
    assert fetched.choices[0].message.content == inline.choices[0].message.content
    assert fetched.usage.prompt_tokens == inline.usage.prompt_tokens
    for name in ("other name", "unknown CA"):
        error = refusal(fetching, tls_hosts[name] + "/cat.png")
        assert error["code"] == "image_url_failed" and "CERTIFICATE_VERIFY_FAILED" in error["message"], (name, error)
    error = refusal(fetching, tls_hosts["trusted"] + "/to-loopback")  # a redirect out of https is checked too
    assert error["code"] == "image_url_refused" and "127.0.0.1" in error["message"]
