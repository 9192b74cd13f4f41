"""Sub-commands of the enrollment layer: ``cryid enroll add|record|list|show|remove|update|reembed|export|import``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``enroll`` to ``cryid``'s parser."""
    del sub  # issue 4 adds enroll ...
