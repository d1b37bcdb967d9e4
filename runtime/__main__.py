"""`python -m runtime`: the edge-runtime command."""

from runtime.cli import main

raise SystemExit(main())
