"""``python -m tests.crash_entry POINT ARGS...``: the ``cryid`` command, killed like ``kill -9`` when a
registry write reaches POINT: ``after-sample`` (a sample and its embeddings are written, the transaction
is still open) or ``before-commit`` (the whole write is done, its COMMIT not yet run).

The points are put in here, in this test-only process, by wrapping the registry's own write API
(``RegistryWrite.insert_sample`` and ``Registry.write``); the product itself has no way to crash on purpose.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from cryid.daemon.cli import main
from cryid.enrollment.registry import NewSample, Registry, RegistryWrite

CRASH_MESSAGE = "test hook: killing this process at {point}"
POINTS = ("after-sample", "before-commit")


def _install(point: str) -> None:
    if point not in POINTS:
        raise SystemExit(f"crash point {point!r} is not one of {', '.join(POINTS)}")

    def crash(name: str) -> None:
        if name == point:
            print(CRASH_MESSAGE.format(point=point), file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    insert_sample = RegistryWrite.insert_sample
    write = Registry.write

    def insert_sample_then_crash(self: RegistryWrite, baby_id: str, sample: NewSample) -> int:
        sample_id = insert_sample(self, baby_id, sample)
        crash("after-sample")
        return sample_id

    @contextmanager
    def write_then_crash(self: Registry, bump: bool = True) -> Iterator[RegistryWrite]:
        with write(self, bump) as tx:
            yield tx
            crash("before-commit")

    RegistryWrite.insert_sample = insert_sample_then_crash  # type: ignore[method-assign]
    Registry.write = write_then_crash  # type: ignore[method-assign,assignment]


def _run(point: str, args: list[str]) -> int:
    _install(point)
    return main(args)


if __name__ == "__main__":
    sys.exit(_run(sys.argv[1], sys.argv[2:]))
