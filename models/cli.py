"""Sub-commands of the model layer: ``cryid model export|info|train`` and ``cryid eval``.

Heavy imports (torch, speechbrain, onnx) happen inside the handlers, never at module import.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``model`` and ``eval`` to ``cryid``'s parser."""
    model = sub.add_parser("model", help="export, inspect and train embedding models")
    msub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    _register_export(msub)
    _register_info(msub)
    _register_train(msub)
    _register_eval(sub)


def _register_export(msub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """issue 2: cryid model export SRC --out DIR [--quantize int8]"""


def _register_info(msub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """issue 2: cryid model info [DIR]"""


def _register_train(msub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """issue 6: cryid model train --data DIR --out DIR [--init SRC] ..."""


def _register_eval(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """issue 5: cryid eval --data DIR --split dev|test [--model DIR | --speechbrain SRC] ..."""
