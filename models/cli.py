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
    from pathlib import Path

    p = msub.add_parser(
        "export",
        help="export a speechbrain ECAPA-TDNN to model.onnx + manifest.json",
        description="SRC is a speechbrain model directory in the Hugging Face layout (hyperparams.yaml, "
        "embedding_model.ckpt, ...) or a hub id (speechbrain/spkrec-ecapa-voxceleb). The export is "
        "checked against speechbrain before anything is written; a model that disagrees is refused.",
    )
    p.add_argument("src", metavar="SRC", help="speechbrain model directory or Hugging Face hub id")
    p.add_argument("--out", type=Path, required=True, help="model directory to write (must not exist)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="write an int8 model (dynamic quantisation)")
    p.add_argument("--backend", type=Path, default=None,
                   help="back-end .npz (mean, transform) to append; default: SRC/backend.npz if present")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")

    def handler(args: argparse.Namespace, settings: object) -> int:
        import shlex
        import sys

        from cryid.models.export import export_model

        command = "cryid " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
        m = export_model(args.src, args.out, quantize=args.quantize, backend=args.backend,
                         command=command, overwrite=args.force)
        extra = (f", int8 vs fp32 min cosine {m.quantization.min_cosine_to_fp32:.4f}"
                 if m.quantization is not None else "")
        print(f"{args.out}: {m.embedding_dim}-d embedding, parity min cosine {m.parity.min_cosine:.6f}"
              f"{extra}, sha256 {m.onnx_sha256[:12]}")
        return 0

    p.set_defaults(func=handler)


def _register_info(msub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """issue 2: cryid model info [DIR]"""
    from pathlib import Path

    p = msub.add_parser("info", help="print a model directory's manifest",
                        description="Prints the manifest of DIR (default: the configured model) and "
                        "checks that model.onnx matches its sha256.")
    p.add_argument("dir", metavar="DIR", type=Path, nargs="?", default=None,
                   help="model directory (default: the configured model, CRYID_MODEL)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")

    def handler(args: argparse.Namespace, settings: object) -> int:
        from cryid.models.manifest import ONNX_NAME, ModelError, load_manifest, sha256_file

        model_dir = args.dir if args.dir is not None else Path(settings.model)  # type: ignore[attr-defined]
        m = load_manifest(model_dir)
        onnx_path = model_dir / ONNX_NAME
        if not onnx_path.is_file():
            raise ModelError(f"{onnx_path}: missing; re-export the model "
                             f"with `cryid model export SRC --out {model_dir}`")
        actual = sha256_file(onnx_path)
        if actual != m.onnx_sha256:
            raise ModelError(f"{onnx_path}: sha256 {actual[:12]}... does not match the manifest's "
                             f"{m.onnx_sha256[:12]}...; the file was changed or damaged, re-export the model")
        if args.json:
            print(m.model_dump_json(indent=2))
            return 0
        fe = m.frontend
        rows = [
            ("model", str(model_dir)),
            ("source", m.source),
            ("created", m.created_at),
            ("embedding", f"{m.embedding_dim}-d, input {m.input_name!r} (batch, frames, {fe.n_mels})"),
            ("front end", f"{fe.sample_rate} Hz, n_fft {fe.n_fft}, hop {fe.hop_length}, {fe.n_mels} mels "
                          f"{fe.f_min_hz:g}-{fe.f_max_hz:g} Hz, top_db {fe.top_db:g}, {fe.normalization}"),
            ("onnx", f"{onnx_path.stat().st_size / 1e6:.1f} MB, opset {m.opset}, "
                     f"sha256 {m.onnx_sha256} (verified)"),
            ("parity", f"min cosine {m.parity.min_cosine:.6f}, max abs diff {m.parity.max_abs_diff:.2e} "
                       f"on {len(m.parity.clips_s)} clips vs {m.parity.reference}"),
            ("quantization", "none (fp32)" if m.quantization is None else
             f"{m.quantization.scheme}; vs fp32 min cosine {m.quantization.min_cosine_to_fp32:.4f}"),
            ("back-end", "none" if m.backend is None else
             f"{m.backend.kind or 'linear'} {m.backend.input_dim}->{m.backend.output_dim} "
             f"({m.backend.file})"),
            ("trained by", m.training.command if m.training is not None and m.training.command else "-"),
            ("metrics", ", ".join(f"{k} {v:.4g}" for k, v in sorted(m.metrics.items())) or "-"),
            ("exported by", m.export_command or "-"),
            ("versions", ", ".join(f"{k} {v}" for k, v in m.versions.items()) or "-"),
        ]
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key:<{width}}  {value}")
        return 0

    p.set_defaults(func=handler)


def _register_train(msub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """issue 6: cryid model train --data DIR --out DIR [--init SRC] ..."""


def _register_eval(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """issue 5: cryid eval --data DIR --split dev|test [--model DIR | --speechbrain SRC] ..."""
