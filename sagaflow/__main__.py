"""The `sagaflow` command line (also `python -m sagaflow`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import anyio

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sagaflow", description="Durable sagas for asyncio and trio."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run the order saga demo on a SQLite file",
        description=(
            "Run thousands of orders through the order saga against simulated services: "
            "most complete, some are compensated or time out, a few end as dead letters. "
            "Stop it and run it again: it resumes from the file."
        ),
    )
    demo.add_argument("--orders", type=int, default=2000, help="orders to place (default 2000)")
    demo.add_argument(
        "--db",
        default="sagaflow-demo.db",
        help="SQLite file (default sagaflow-demo.db); ':memory:' for no file",
    )
    demo.add_argument(
        "--stop-after", type=int, default=None, help="stop after placing this many orders"
    )
    demo.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    demo.add_argument("--quiet", action="store_true", help="no progress line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        async def demo() -> bool:
            result = await run_demo(
                orders=args.orders,
                db=args.db,
                stop_after=args.stop_after,
                progress=not args.quiet,
            )
            return result.finished or args.stop_after is not None

        try:
            ok = anyio.run(demo, backend=args.backend)
        except KeyboardInterrupt:
            print("\ninterrupted: everything committed is in the file; run again to resume")
            return 130
        return 0 if ok else 1
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
