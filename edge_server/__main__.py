"""`python -m edge_server` is the `edge-server` command."""

from .cli import main

raise SystemExit(main())
