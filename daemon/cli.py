"""The ``cryid`` command: parses arguments, loads the one ``Settings``, hands each layer its part.

Each layer registers its own sub-commands (``cryid.models.cli``, ``cryid.enrollment.cli``); the daemon's
commands (run, devices, demo, config, schema) are registered here. A handler has the signature
``handler(args, settings) -> int``. Bad input ends with a one-line ``cryid: error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from cryid.daemon import logfmt

logger = logging.getLogger(__name__)


def _format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "settings"
        parts.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return "invalid configuration: " + "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    from cryid.daemon import commands
    from cryid.enrollment import cli as enrollment_cli
    from cryid.models import cli as models_cli

    parser = argparse.ArgumentParser(
        prog="cryid", description="Which newborn is crying? Live cry identification."
    )
    parser.add_argument("--config", type=Path, default=None, help="TOML config file (or CRYID_CONFIG).")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="More log output (-vv: debug).")
    parser.add_argument("--log-format", choices=("text", "json"), default="text", help="json: one per line.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.register(sub)
    enrollment_cli.register(sub)
    models_cli.register(sub)
    return parser


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    logfmt.install(args.log_format)
    from cryid.daemon.config import load_settings

    try:
        settings = load_settings(args.config)
    except ValidationError as exc:
        print(f"cryid: error: {_format_validation_error(exc)}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"cryid: error: {exc}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args, settings) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        # Own error types derive from ValueError: one line naming the problem and the fix.
        logger.debug("command failed", exc_info=True)
        print(f"cryid: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
