"""The ``lmtop`` command line."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from lmtop.hooks import __version__, schema

from . import alert_settings, collector
from .alert_settings import AlertSettings


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
        "--summary",
        action="store_true",
        help="one line per run (final and best loss and eval loss, steps, time, alerts) and exit; "
        "JSON lines with --headless",
    )
    parser.add_argument(
        "--no-follow",
        dest="follow",
        action="store_false",
        help="print what is recorded and exit instead of following live runs",
    )
    parser.add_argument(
        "--refresh",
        type=_positive,
        default=2.0,
        metavar="HZ",
        help="most redraws per second (default 2; 4 doubles what crosses an SSH link)",
    )
    alerts = parser.add_argument_group("alerts")
    alerts.add_argument("--no-alerts", action="store_true", help="raise no alerts")
    alerts.add_argument(
        "--config",
        metavar="FILE",
        help="alert settings (TOML); default ~/.config/lmtop/lmtop.toml and an lmtop.toml beside the runs",
    )
    alerts.add_argument(
        "--alert-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one alert setting, e.g. spike.warning_ratio=20 or stall.min_seconds=60 (repeatable)",
    )
    alerts.add_argument(
        "--spike-threshold",
        type=float,
        metavar="MADS",
        help=(
            "the least size of a spike, in noise scales of the metric's own log-scale baseline "
            f"(spike.tail_threshold; default {AlertSettings().spike.tail_threshold:g})"
        ),
    )
    alerts.add_argument(
        "--on-alert",
        metavar="CMD",
        help="run CMD (a shell command) for each alert, its JSON on stdin; rate-limited",
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
    parser = _parser()
    args = parser.parse_args(args_list)
    settings = _alert_settings(parser, args)
    if args.summary:
        from . import summary

        collector.settle()
        return summary.run(args.paths, as_json=args.headless, settings=settings)
    if args.headless:
        from . import headless

        collector.settle()
        return headless.run(args.paths, follow=args.follow, settings=settings)
    from .app import run_app

    collector.settle()
    return run_app(args.paths, follow=args.follow, refresh_hz=args.refresh, settings=settings)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _alert_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> AlertSettings:
    """The alert settings from the files and flags; a bad one ends with a usage error."""
    overrides = list(args.alert_set)
    if args.spike_threshold is not None:
        overrides.append(f"spike.tail_threshold={args.spike_threshold}")
    if args.on_alert:
        overrides.append(f"on_alert={args.on_alert}")
    if args.no_alerts:
        overrides.append("enabled=false")
    try:
        return alert_settings.load(args.paths, args.config, overrides)
    except alert_settings.SettingsError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
