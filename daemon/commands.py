"""Sub-commands of the daemon layer: run, devices, demo, config check, schema."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the daemon's sub-commands to ``cryid``'s parser."""
    del sub  # issue 3 adds run, devices, demo, config, schema
