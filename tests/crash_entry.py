"""``python -m tests.crash_entry POINT ARGS...``: the ``cryid`` command, killed like ``kill -9`` when a
registry write reaches POINT (``after-sample``, ``before-commit``), through the registry's test seam
``cryid.enrollment.registry.crash_hook``; the product itself has no way to crash on purpose."""

from __future__ import annotations

import os
import signal
import sys

from cryid.daemon.cli import main
from cryid.enrollment import registry

CRASH_MESSAGE = "test hook: killing this process at {point}"


def _run(point: str, args: list[str]) -> int:
    def hook(name: str) -> None:
        if name == point:
            print(CRASH_MESSAGE.format(point=point), file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    registry.crash_hook = hook
    return main(args)


if __name__ == "__main__":
    sys.exit(_run(sys.argv[1], sys.argv[2:]))
