"""`python -m edge_server` is the `edge-server` command."""

from edge_server.cli import main

raise SystemExit(main())
