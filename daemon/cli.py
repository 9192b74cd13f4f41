"""The ``cryid`` command: parses arguments, loads the one ``Settings``, hands each layer its part.

Each layer registers its own sub-commands (``cryid.models.cli``, ``cryid.enrollment.cli``); the daemon's
commands (run, devices, demo, config, schema) are registered here. A handler has the signature
``handler(args, settings) -> int``.

Errors: a ``CryidError`` (what a user can fix) or an ``OSError`` ends with a one-line
``cryid: error: ...`` and exit 2; any other exception is a bug and keeps its traceback (exit 1).
Output cut short by a closed pipe (``cryid enroll list | head``) ends quietly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from cryid.daemon import logfmt
from cryid.models.errors import CryidError, validation_message

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer killed by a closed pipe


def one_line(message: object) -> str:
    """A message on one line: newlines and other control characters are shown escaped, never raw."""
    text = str(message)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _add_verbose_to_subcommands(parser: argparse.ArgumentParser, seen: set[int] | None = None) -> None:
    """``-v`` is accepted after the sub-command too (``cryid run -v``, ``cryid enroll list -v``)."""
    seen = set() if seen is None else seen
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for child in action.choices.values():
            if id(child) in seen:  # aliases share one parser
                continue
            seen.add(id(child))
            child.add_argument(
                "-v", "--verbose", dest="sub_verbose", action="count", default=argparse.SUPPRESS,
                help="More log output (-vv: debug).",
            )
            _add_verbose_to_subcommands(child, seen)


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
    _add_verbose_to_subcommands(parser)
    return parser


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _error(message: object) -> int:
    print(f"cryid: error: {one_line(message)}", file=sys.stderr)
    return EXIT_USER_ERROR


def _quiet_broken_pipe() -> int:
    """The reader went away (``| head``): stop writing, say nothing, and keep Python from complaining."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout has no file descriptor (embedded): nothing to silence
        pass
    return EXIT_BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose + getattr(args, "sub_verbose", 0))
    logfmt.install(args.log_format)
    from cryid.daemon.config import load_settings, warn_unknown_environment

    warn_unknown_environment()
    try:
        settings = load_settings(args.config)
    except ValidationError as exc:
        return _error(
            "invalid configuration: " + validation_message(exc, where="settings", every=True, inputs=True)
        )
    except (CryidError, OSError) as exc:
        return _error(exc)
    try:
        code = int(args.func(args, settings) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handling below, not at exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except (CryidError, OSError) as exc:
        # What the user can fix: one line naming the problem and the fix. Anything else is a bug and
        # keeps its traceback (exit 1).
        logger.debug("command failed", exc_info=True)
        return _error(exc)


if __name__ == "__main__":
    sys.exit(main())
