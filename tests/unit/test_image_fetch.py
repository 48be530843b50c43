"""The image URL fetcher's address checks (api/imagefetch.py): which addresses count as public, a name resolved
once and connected to at the checked address (no DNS rebinding), a name with any private address refused."""

from __future__ import annotations

import ipaddress
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edge_server.api.errors import APIError
from edge_server.api.imagefetch import ImageFetcher, is_public, parse_networks


@pytest.mark.parametrize("address, public", [
    ("93.184.216.34", True), ("2606:4700::1111", True), ("8.8.8.8", True),
    ("127.0.0.1", False), ("127.9.9.9", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("255.255.255.255", False),
    ("224.0.0.1", False), ("::1", False), ("::", False), ("fe80::1", False), ("fd00::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("64:ff9b::7f00:1", False), ("ff02::1", False),
])
def test_only_public_unicast_addresses_are_public(address, public):
    assert is_public(ipaddress.ip_address(address)) is public


class _Cat(BaseHTTPRequestHandler):
    requests: list[tuple[str, str | None]] = []  # (path, X-Injected header)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.requests.append((self.path, self.headers.get("X-Injected")))
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"cat")

    def log_message(self, *args) -> None:
        """Quiet."""


@pytest.fixture
def cat_server():
    server = ThreadingHTTPServer(("127.0.0.2", 0), _Cat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_the_checked_address_is_the_one_connected_to(cat_server, monkeypatch):
    answers = iter(["127.0.0.2", "127.0.0.1"])  # a rebinding name: allowed first, loopback after
    lookups = []

    def getaddrinfo(host, port, *args, **kwargs):
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    fetcher = ImageFetcher(max_bytes=100, timeout=5, allowed_networks=parse_networks(["127.0.0.2/32"]))
    fetched = fetcher.fetch(f"http://rebinding.example:{cat_server}/cat.png", "p")
    assert fetched.data == b"cat" and lookups == ["rebinding.example"]


def test_a_name_with_any_private_address_is_refused(monkeypatch):
    def getaddrinfo(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))
                for address in ("93.184.216.34", "10.0.0.1")]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(APIError) as refused:
        ImageFetcher(max_bytes=100, timeout=5).fetch("https://mixed.example/cat.png", "p")
    assert refused.value.code == "image_url_refused" and "10.0.0.1" in refused.value.message


def test_a_non_ascii_path_is_sent_percent_encoded(cat_server):
    fetcher = ImageFetcher(max_bytes=100, timeout=5, allowed_networks=parse_networks(["127.0.0.2/32"]))
    _Cat.requests.clear()
    assert fetcher.fetch(f"http://127.0.0.2:{cat_server}/chat noir/café.png?q=ü", "p").data == b"cat"
    assert fetcher.fetch(f"http://127.0.0.2:{cat_server}/a\r\nX-Injected: 1", "p").data == b"cat"
    for bad in ("http://[::1/cat.png", "http://127.0.0.2:99999/cat.png", "http:///cat.png"):
        with pytest.raises(APIError) as refused:
            fetcher.fetch(bad, "p")
        assert refused.value.code == "invalid_image", bad
    # urlsplit drops CR and LF: no header can be smuggled in.
    assert _Cat.requests == [("/chat%20noir/caf%C3%A9.png?q=%C3%BC", None), ("/aX-Injected:%201", None)]
