"""Log output: the start line at every level, and ``--log-format json`` for journald / ELK.

``json``: one JSON object per line with ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
``thread``, and ``exc`` when an exception is attached; what a log shipper indexes without parsing.
The start line of ``cryid run`` goes to the logger ``cryid.start``, which is shown at the default
level (warnings) too: one line saying what the daemon listens to and where it publishes.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

START_LOGGER = "cryid.start"
PAHO_LOGGER = "cryid.daemon.mqtt.paho"  # where cryid.daemon.mqtt sends paho's log
LOG_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "thread": record.threadName,
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class PahoReconnectNoise(logging.Filter):
    """paho's own lines while it reconnects ("Client is not connected", "Connection failed"): the
    publisher already warns with the broker's address and the retry delay (cryid.daemon.mqtt)."""

    NOISE = ("Client is not connected", "Connection failed, retrying")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


def install(log_format: str) -> None:
    """After ``logging.basicConfig``: show the start line, and switch the handlers to JSON if asked."""
    logging.getLogger(PAHO_LOGGER).addFilter(PahoReconnectNoise())
    start = logging.getLogger(START_LOGGER)
    if start.getEffectiveLevel() > logging.INFO:
        start.setLevel(logging.INFO)
    if log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
