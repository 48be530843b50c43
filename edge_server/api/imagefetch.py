"""Remote image URLs (`--allow-image-urls`): fetched on the request's HTTP thread, http(s) only, bounded in bytes
and time, never from loopback, private, link-local or other non-public addresses. The host is resolved once,
every address checked, and the connection made to the checked address (no DNS-rebinding gap); each redirect
is checked the same way."""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

from edge_server.api.errors import APIError

MAX_REDIRECTS = 3
_READ = 64 << 10  # bytes per read
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Sequence[str]) -> tuple[IPNetwork, ...]:
    """CIDR strings as networks (ValueError names a bad one)."""
    return tuple(ipaddress.ip_network(value.strip(), strict=False) for value in values if value.strip())


def is_public(address: IPAddress) -> bool:
    """Whether `address` is a public unicast address (not loopback, private, link-local, shared, reserved,
    multicast or unspecified; an IPv4-mapped or NAT64-embedded IPv6 address is judged by its IPv4 address)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return is_public(address.ipv4_mapped)
        if address in ipaddress.ip_network("64:ff9b::/96"):
            return is_public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return address.is_global and not address.is_multicast


@dataclass(frozen=True)
class FetchedImage:
    """An image's bytes and the media type its server named (None when it named none)."""

    data: bytes
    media: str | None


class ImageFetcher:
    """Fetches one request's image URLs under the server's limits: `max_bytes` each, all of them within `timeout`
    seconds (so a request's eight slow URLs hold its thread no longer than one); `allowed_networks` (tests only)
    adds networks that may be reached although they are not public."""

    def __init__(self, *, max_bytes: int, timeout: float, allowed_networks: Sequence[IPNetwork] = ()):
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.allowed_networks = tuple(allowed_networks)
        self._deadline: float | None = None  # set by the first fetch

    def fetch(self, url: str, param: str) -> FetchedImage:
        """The image at `url`, following at most `MAX_REDIRECTS` checked redirects; a 400 naming `param` for a
        URL that is not http(s), an address that is not public, an answer other than 200, too many bytes, or
        servers slower than the time limit (from the request's first lookup to this image's last byte)."""
        if self._deadline is None:
            self._deadline = time.monotonic() + self.timeout
        deadline = self._deadline
        for _ in range(MAX_REDIRECTS + 1):
            host, port, target, tls = self._split(url, param)
            address = self._checked_address(host, port, param, deadline)
            connection = _PinnedConnection(host, port, address, tls=tls, timeout=self._left(deadline, param))
            try:
                response = self._get(connection, host, port, tls, target, param, deadline)
                if response.status in (301, 302, 303, 307, 308):
                    location = response.getheader("Location")
                    if not location:
                        raise APIError(f"The image URL answered HTTP {response.status} without a Location.",
                                       param=param, code="image_url_failed")
                    url = urljoin(url, location)
                    continue
                if response.status != 200:
                    raise APIError(f"The image URL answered HTTP {response.status} {response.reason}.".rstrip(),
                                   param=param, code="image_url_failed")
                return FetchedImage(self._body(response, connection, param, deadline), _media(response))
            except (OSError, http.client.HTTPException, ValueError) as error:  # ValueError: a URL http.client refuses
                if isinstance(error, TimeoutError | socket.timeout):
                    raise self._too_slow(param) from None
                raise APIError(f"The image URL could not be fetched: {error}.", param=param,
                               code="image_url_failed") from None
            finally:
                connection.close()
        raise APIError(f"The image URL redirected more than {MAX_REDIRECTS} times.", param=param,
                       code="image_url_failed")

    @staticmethod
    def _split(url: str, param: str) -> tuple[str, int, str, bool]:
        try:
            parts = urlsplit(url)
        except ValueError:  # e.g. an unclosed [IPv6 literal
            raise APIError("The image URL is not a valid URL.", param=param, code="invalid_image") from None
        if parts.scheme not in ("http", "https"):
            raise APIError("Only http and https image URLs are fetched.", param=param, code="image_url_refused")
        if parts.username is not None or parts.password is not None:
            raise APIError("Image URLs with credentials are not fetched.", param=param, code="image_url_refused")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise APIError("The image URL's port is not valid.", param=param, code="invalid_image") from None
        if not parts.hostname:
            raise APIError("The image URL has no host.", param=param, code="invalid_image")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # Non-ASCII characters percent-encoded, as browsers send them; what is already encoded stays.
        return parts.hostname, port, quote(target, safe="/%?=&;:@!$'()*+,~"), parts.scheme == "https"

    def _checked_address(self, host: str, port: int, param: str, deadline: float) -> str:
        """The address to connect to: every address the host resolves to must be allowed (a name that also
        resolves to a private address is refused whole)."""
        addresses = _resolve(host, port, self._left(deadline, param))
        if addresses is None:
            raise self._too_slow(param)
        if not addresses:
            raise APIError(f"The image URL's host {host!r} does not resolve.", param=param, code="image_url_failed")
        for address in addresses:
            if not (is_public(address) or any(address in network for network in self.allowed_networks)):
                raise APIError(f"The image URL's host {host!r} is at {address}, which is not a public address; "
                               f"images are only fetched from the public internet.", param=param,
                               code="image_url_refused")
        return str(addresses[0])

    def _get(self, connection: _PinnedConnection, host: str, port: int, tls: bool, target: str, param: str,
             deadline: float) -> http.client.HTTPResponse:
        default_port = 443 if tls else 80
        connection.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
        name = f"[{host}]" if ":" in host else host
        connection.putheader("Host", name if port == default_port else f"{name}:{port}")
        connection.putheader("Accept", "image/png, image/jpeg, image/webp, image/gif")
        connection.putheader("User-Agent", "edge-server")
        connection.endheaders()
        connection.pinned.settimeout(self._left(deadline, param))
        return connection.getresponse()

    def _body(self, response: http.client.HTTPResponse, connection: _PinnedConnection, param: str,
              deadline: float) -> bytes:
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise self._too_large(param)
        chunks, size = [], 0
        while True:
            connection.pinned.settimeout(self._left(deadline, param))  # each read within what is left
            chunk = response.read1(_READ)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > self.max_bytes:  # cut off here: no more is read
                raise self._too_large(param)
            chunks.append(chunk)

    def _left(self, deadline: float, param: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._too_slow(param)
        return left

    def _too_slow(self, param: str) -> APIError:
        return APIError(f"The request's image URLs did not answer within {self.timeout:g} s (--image-url-timeout).",
                        param=param, code="image_url_timeout")

    def _too_large(self, param: str) -> APIError:
        return APIError(f"The image at the URL is larger than {self.max_bytes} bytes.", param=param,
                        code="image_too_large")


def _media(response: http.client.HTTPResponse) -> str | None:
    kind = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
    return kind or None


def _resolve(host: str, port: int, timeout: float) -> list[IPAddress] | None:
    """The host's addresses (an IP literal is its own), or None when the lookup outlasts `timeout` (a thread
    bounds it: getaddrinfo has no timeout of its own)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    found: list[list[IPAddress]] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            found.append([])
            return
        found.append(list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos)))

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    return found[0] if found else None


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to `address`, which was checked, for the URL's `host` (its Host header and, for
    https, the name its certificate must carry)."""

    def __init__(self, host: str, port: int, address: str, *, tls: bool, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address, self._tls = address, tls
        self.pinned: socket.socket | None = None  # kept: http.client lets go of `sock` once a response says close

    def connect(self) -> None:
        """Connect to the checked address, never to a new lookup of the host."""
        family = socket.AF_INET6 if ":" in self._address else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)  # not create_connection: no lookup at all
        try:
            self.sock.settimeout(self.timeout)
            self.sock.connect((self._address, self.port))
        except OSError:
            self.sock.close()
            raise
        if self._tls:
            self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=self.host)
        self.pinned = self.sock
