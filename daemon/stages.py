"""Where an expiration's time goes: monotonic stamps at every stage, and their p50/p95 per step.

Each expiration event is stamped (``time.monotonic()``) on its way through the daemon:

- ``audio_end``: when its last sample was heard, i.e. the read time of the chunk that completed it,
  less the audio after the expiration's end in that chunk and the chunks before (the segmenter must
  hear ``hangover_ms`` without a cry, minus the ``post_roll_ms`` kept, before it knows the end);
- ``read``: the source delivered the chunk whose processing produced the expiration;
- ``detected``: the segmenter returned it (end of expiration found, after the hang-over);
- ``embedded``: the ONNX embedder returned its embedding;
- ``identified``: the identifier scored it and built the event;
- ``stored``: the event is committed to the outbox (the fsync follows in the main thread, see
  :meth:`cryid.daemon.outbox.Outbox.sync`);
- ``handed``: paho's ``publish()`` took it (PUBLISH written, or queued for paho's thread);
- ``acked``: the broker's PUBACK arrived.

:class:`StageClock` keeps the stamps of events in flight (stored by the pipeline thread, handed by
whoever pumps, acknowledged in paho's thread) and the step durations of the last ``window`` completed
expirations; :meth:`StageClock.summary` gives p50/p95/max per step in ms for the stats topic.
Provisional ``expiration`` events only: final ``episode`` events are made by the clock, not by audio.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from pydantic import Field

from cryid.models.strict import StrictModel

STAGES = ("audio_end", "read", "detected", "embedded", "identified", "stored", "handed", "acked")
"""The stamps, in the order an expiration passes them."""

STEPS: tuple[tuple[str, str, str], ...] = (
    ("audio_end", "read", "heard_to_read"),
    ("read", "detected", "read_to_detected"),
    ("detected", "embedded", "detected_to_embedded"),
    ("embedded", "identified", "embedded_to_identified"),
    ("identified", "stored", "identified_to_stored"),
    ("stored", "handed", "stored_to_handed"),
    ("handed", "acked", "handed_to_acked"),
    ("audio_end", "handed", "end_to_publish"),
    ("audio_end", "acked", "end_to_puback"),
)
"""(from stamp, to stamp, name) of every figure reported; the last two are the totals."""


@dataclass(frozen=True)
class StageStamps:
    """Monotonic times of one expiration at each stage (None: not reached yet)."""

    audio_end: float | None = None
    read: float | None = None
    detected: float | None = None
    embedded: float | None = None
    identified: float | None = None
    stored: float | None = None
    handed: float | None = None
    acked: float | None = None

    def at(self, **stamps: float) -> StageStamps:
        return replace(self, **stamps)

    def steps(self) -> dict[str, float]:
        """Seconds of every step whose two stamps are set."""
        out = {}
        for a, b, name in STEPS:
            ta, tb = getattr(self, a), getattr(self, b)
            if ta is not None and tb is not None:
                out[name] = tb - ta
        return out


class StepFigure(StrictModel):
    """One step over the last completed expirations, in milliseconds."""

    n: int = Field(..., description="Expirations measured.")
    p50_ms: float = Field(..., description="Median, ms.")
    p95_ms: float = Field(..., description="95th percentile, ms.")
    max_ms: float = Field(..., description="Largest, ms.")


class StageClock:
    """Stamps of the events in flight and the step durations of the last ``window`` expirations."""

    def __init__(
        self,
        window: int = 1000,
        clock: Callable[[], float] | None = None,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        import time

        self._clock = clock or time.monotonic
        self._observe = observe  # (step name, seconds): e.g. a Prometheus histogram
        self._lock = threading.Lock()
        self._open: dict[str, StageStamps] = {}  # event id -> stamps so far
        self._done: deque[dict[str, float]] = deque(maxlen=window)
        self.completed = 0

    def stored(self, event_id: str, stamps: StageStamps) -> None:
        """Pipeline thread: the event is in the outbox (stamped now)."""
        with self._lock:
            if len(self._open) > 10000:  # published long ago or dropped: bound the map
                self._open.clear()
            self._open[event_id] = stamps.at(stored=self._clock())

    def handed(self, event_id: str) -> None:
        """The event's first PUBLISH was handed to paho (stamped now)."""
        now = self._clock()
        with self._lock:
            st = self._open.get(event_id)
            if st is not None and st.handed is None:
                self._open[event_id] = st.at(handed=now)

    def acked(self, event_id: str) -> None:
        """paho's thread: the broker acknowledged the event; its steps join the window."""
        now = self._clock()
        with self._lock:
            st = self._open.pop(event_id, None)
            if st is None:
                return
            steps = st.at(acked=now).steps()
            self._done.append(steps)
            self.completed += 1
        if self._observe is not None:
            for name, seconds in steps.items():
                self._observe(name, seconds)

    def records(self) -> list[dict[str, float]]:
        """The step durations (seconds) of every expiration in the window, oldest first."""
        with self._lock:
            return [dict(d) for d in self._done]

    def summary(self) -> dict[str, StepFigure]:
        """p50/p95/max of every step over the window (steps with no measurement are left out)."""
        with self._lock:
            done = list(self._done)
        out = {}
        for _a, _b, name in STEPS:
            vals = np.array([d[name] for d in done if name in d]) * 1000.0
            if vals.size:
                p50, p95 = np.percentile(vals, [50, 95])
                out[name] = StepFigure(
                    n=int(vals.size), p50_ms=round(float(p50), 2), p95_ms=round(float(p95), 2),
                    max_ms=round(float(vals.max()), 2),
                )  # fmt: skip
        return out
