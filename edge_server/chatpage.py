"""The chat page at `/`: one self-contained HTML file that talks to our own API."""

from __future__ import annotations

from flask import Blueprint

page = Blueprint("chatpage", __name__)
