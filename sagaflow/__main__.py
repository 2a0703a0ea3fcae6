"""The `sagaflow` command line (also `python -m sagaflow`); the code lives in `_cli`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    from ._cli import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
