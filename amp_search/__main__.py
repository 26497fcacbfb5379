"""``python -m amp_search`` runs the CLI."""

from __future__ import annotations

import sys

from amp_search.cli import main

if __name__ == "__main__":
    sys.exit(main())
