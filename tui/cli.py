"""The ``lmtop`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lmtop.hooks import __version__, schema


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmtop",
        description="top for LLM training runs: live charts of every rank, alerts on spikes and NaN.",
        epilog=(
            "With no PATH, lmtop follows every live run of this user. "
            "`lmtop demo --help` shows the demo's options."
        ),
    )
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="a run directory, a rank file or a folder of runs (e.g. ./lmtop_runs)",
    )
    parser.add_argument(
        "--headless", action="store_true", help="print JSON lines instead of the screen"
    )
    parser.add_argument(
        "--no-follow",
        dest="follow",
        action="store_false",
        help="print what is recorded and exit instead of following live runs",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"lmtop {__version__} (protocol v{schema.PROTOCOL_VERSION})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``lmtop`` command; returns its exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["demo"]:
        from .demo import main as demo_main

        return demo_main(args_list[1:])
    args = _parser().parse_args(args_list)
    if args.headless:
        from . import headless

        return headless.run(args.paths, follow=args.follow)
    from .app import run_app

    return run_app(args.paths, follow=args.follow)


if __name__ == "__main__":
    sys.exit(main())
