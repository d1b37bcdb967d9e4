"""`python -m toolchain`."""

from toolchain.cli import main

raise SystemExit(main())
