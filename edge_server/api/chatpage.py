"""The chat page at `/`: one self-contained HTML file that talks to our own API."""

from __future__ import annotations

from importlib import resources

from flask import Blueprint, Response, request

from edge_server.api.declaration import Reply, documented

page = Blueprint("chatpage", __name__)

PAGE_DIR, PAGE_NAME = "static", "chat.html"  # inside the edge_server package
# The page is inline CSS + JS that only ever talks to this server: say so, so a stray external
# resource fails loudly in the browser console instead of silently needing the network.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@page.get("/")
@documented("chatPage", "page", "The chat page (self-contained HTML)", {
    200: Reply("The page.", media="text/html", headers=("ETag",)),
    304: Reply("Not modified (the `If-None-Match` ETag is current).", headers=("ETag",)),
}, params={"If-None-Match": "the ETag of a page fetched earlier: 304 while it is current"})
def chat_page() -> Response:
    """The chat page (read per request: a few KB, and edits show without a restart)."""
    html = resources.files(__package__).joinpath(PAGE_DIR).joinpath(PAGE_NAME).read_bytes()
    response = Response(html, content_type="text/html; charset=utf-8", headers={
        "Cache-Control": "no-cache",
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    })
    response.add_etag()
    return response.make_conditional(request)
