"""Sub-commands of the model layer: ``cryid model export|info|train|calibrate`` and ``cryid eval``.

Heavy imports (torch, speechbrain, onnx) happen inside the handlers, never at module import.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cryid.models.errors import UsageError, validation_message

if TYPE_CHECKING:
    from pydantic import ValidationError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``model`` and ``eval`` to ``cryid``'s parser."""
    model = sub.add_parser("model", help="export, inspect and train embedding models")
    msub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    _register_export(msub)
    _register_info(msub)
    _register_train(msub)
    _register_calibrate(msub)
    _register_eval(sub)


def _option_error(exc: ValidationError) -> UsageError:
    """A pydantic ValidationError of CLI options as one line naming the option."""
    return UsageError(validation_message(exc, options=True))


def _add_calibrate_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """Options of ``cryid.models.training.settings.CalibrateSettings`` (its defaults and descriptions)."""
    from cryid.models.training.settings import CalibrateSettings

    fields = CalibrateSettings.model_fields
    for name, typ in (
        ("split", str),
        ("room_size", int),
        ("room_strangers", int),
        ("rooms", int),
        ("seed", int),
        ("folds", int),
        ("target_wrong_rate", float),
        ("bootstrap", int),
    ):
        flag = f"--{prefix}{name.replace('_', '-')}"
        help_text = f"{fields[name].description} (default: {fields[name].default})".replace("%", "%%")
        p.add_argument(flag, dest=f"cal_{name}", type=typ, default=None, help=help_text)


def _run_calibration(model_dir: object, data: object, args: argparse.Namespace, settings: object) -> None:
    """Fit and store the calibration; print its figures."""
    from pathlib import Path

    from pydantic import ValidationError

    from cryid.models.evaluation.embedders import default_cache_dir
    from cryid.models.evaluation.outputs import calibration_lines
    from cryid.models.training.calibrate import CalibrateSettings, calibrate_model

    given = {k[4:]: v for k, v in vars(args).items() if k.startswith("cal_") and v is not None}
    try:
        cal_settings = CalibrateSettings(**given)
    except ValidationError as exc:
        raise _option_error(exc) from None
    result = calibrate_model(
        Path(str(model_dir)),
        Path(str(data)),
        cal_settings,
        settings.segmenter,  # type: ignore[attr-defined]
        settings.embedder,
        default_cache_dir(),  # type: ignore[attr-defined]
    )
    for line in calibration_lines(result):
        print(line)


def _register_export(msub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """cryid model export SRC --out DIR [--quantize int8] [--backend NPZ] [--force]"""
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
    p.add_argument(
        "--quantize", choices=["int8"], default=None, help="write an int8 model (dynamic quantisation)"
    )
    p.add_argument(
        "--backend",
        type=Path,
        default=None,
        help="back-end .npz (mean, transform) to append; default: SRC/backend.npz if present",
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--calibrate-data",
        type=Path,
        default=None,
        metavar="DIR",
        help="after export, calibrate on this CryCeleb-layout data (as `cryid model calibrate`)",
    )
    _add_calibrate_options(p, prefix="calibrate-")

    def handler(args: argparse.Namespace, settings: object) -> int:
        import shlex

        from cryid.models.training.export import export_model

        parts = ["cryid", "model", "export", args.src, "--out", str(args.out)]
        parts += ["--quantize", args.quantize] if args.quantize else []
        parts += ["--backend", str(args.backend)] if args.backend else []
        command = " ".join(shlex.quote(x) for x in parts)
        m = export_model(
            args.src,
            args.out,
            quantize=args.quantize,
            backend=args.backend,
            command=command,
            overwrite=args.force,
        )
        extra = (
            f", int8 vs fp32 min cosine {m.quantization.min_cosine_to_fp32:.4f}"
            if m.quantization is not None
            else ""
        )
        print(
            f"{args.out}: {m.embedding_dim}-d embedding, parity min cosine {m.parity.min_cosine:.6f}"
            f"{extra}, sha256 {m.onnx_sha256[:12]}"
        )
        if args.calibrate_data is not None:
            _run_calibration(args.out, args.calibrate_data, args, settings)
        else:
            print(f"calibrate it (needed for decisions): cryid model calibrate {args.out} --data DIR")
        return 0

    p.set_defaults(func=handler)


def _source_shown(source: str) -> str:
    """The manifest's source without the exporting machine's absolute path (a hub id stays as is)."""
    from pathlib import Path

    path = Path(source)
    if not path.is_absolute():
        return source
    where = "here" if path.is_dir() else "on the machine that exported it, not shipped"
    return f"{path.name} (a local model folder, {where})"


def _register_info(msub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """cryid model info [DIR] [--json]"""
    from pathlib import Path

    p = msub.add_parser(
        "info",
        help="print a model directory's manifest",
        description="Prints the manifest of DIR (default: the configured model) and "
        "checks that model.onnx matches its sha256.",
    )
    p.add_argument(
        "dir",
        metavar="DIR",
        type=Path,
        nargs="?",
        default=None,
        help="model directory (default: the configured model, CRYID_MODEL)",
    )
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")

    def handler(args: argparse.Namespace, settings: object) -> int:
        from cryid.models.config import EmbedderSettings
        from cryid.models.embedder import Embedder
        from cryid.models.manifest import ONNX_NAME

        model_dir = args.dir if args.dir is not None else Path(settings.model)  # type: ignore[attr-defined]
        # Loading the Embedder checks the manifest, the sha256 and that onnxruntime accepts the graph.
        m = Embedder(model_dir, EmbedderSettings(warmup=False)).manifest
        onnx_path = model_dir / ONNX_NAME
        if args.json:
            print(m.model_dump_json(indent=2))
            return 0
        fe = m.frontend
        rows = [
            ("model", str(model_dir)),
            ("source", _source_shown(m.source)),
            ("created", m.created_at),
            ("embedding", f"{m.embedding_dim}-d, input {m.input_name!r} (batch, frames, {fe.n_mels})"),
            (
                "front end",
                f"{fe.sample_rate} Hz, n_fft {fe.n_fft}, hop {fe.hop_length}, {fe.n_mels} mels "
                f"{fe.f_min_hz:g}-{fe.f_max_hz:g} Hz, top_db {fe.top_db:g}, {fe.normalization}",
            ),
            (
                "onnx",
                f"{onnx_path.stat().st_size / 1e6:.1f} MB, opset {m.opset}, "
                f"sha256 {m.onnx_sha256} (verified, loads)",
            ),
            (
                "parity",
                f"min cosine {m.parity.min_cosine:.6f}, max abs diff {m.parity.max_abs_diff:.2e} "
                f"on {len(m.parity.clips_s)} clips vs {m.parity.reference}",
            ),
            (
                "quantization",
                "none (fp32)"
                if m.quantization is None
                else f"{m.quantization.scheme}; vs fp32 min cosine {m.quantization.min_cosine_to_fp32:.4f}",
            ),
            (
                "back-end",
                "none"
                if m.backend is None
                else f"{m.backend.kind or 'linear'} {m.backend.input_dim}->{m.backend.output_dim} "
                f"({m.backend.file})",
            ),
            (
                "GMM branch",
                "none"
                if m.branch is None
                else f"{m.branch.members} UBM(s) x {m.branch.components} components on {m.branch.cepstra} "
                f"cepstra + deltas -> {m.branch.output_dim}-d, fused with the back-end ({m.branch.file})",
            ),
            ("trained by", m.training.command if m.training is not None and m.training.command else "-"),
            ("calibration", _calibration_row(m.calibration)),
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
    """cryid model train --data DIR --out DIR [--init SRC] ...

    One option per field of ``cryid.models.training.settings.TrainSettings`` (its defaults and
    descriptions; the CLI restates none), e.g. ``--channels 256 --bandlimit-p 0.5 --backend lda``.
    """
    import types
    import typing
    from pathlib import Path

    from cryid.models.training.settings import TrainSettings

    p = msub.add_parser(
        "train",
        help="train (or fine-tune) an ECAPA-TDNN on cries in CryCeleb layout",
        description="The CryCeleb recipe (Fbank 80, ECAPA-TDNN, AAM-softmax, Adam, random 3-5 s chunks); "
        "validates dev EER after each epoch, keeps the best, resumes an interrupted run in the same --out.",
    )
    p.add_argument("--data", type=Path, required=True, help="Data in CryCeleb layout (metadata.csv, audio/).")
    p.add_argument("--out", type=Path, required=True, help="Output folder (speechbrain layout).")
    p.add_argument("--init", default=None, help="Fine-tune this speechbrain model (local folder or hub id).")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    for name, field in TrainSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        ann = field.annotation
        if typing.get_origin(ann) in (typing.Union, types.UnionType):  # X | None: offer X
            ann = next(a for a in typing.get_args(ann) if a is not type(None))
        args = typing.get_args(ann)
        default = field.default
        help_text = f"{field.description} (default: {default})".replace("%", "%%")  # argparse formats help
        if ann is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(ann) is typing.Literal:
            p.add_argument(flag, choices=list(args), default=None, help=help_text)
        elif typing.get_origin(ann) is tuple:
            nargs = "+" if Ellipsis in args else len(args)
            p.add_argument(flag, type=float, nargs=nargs, default=None, metavar="X", help=help_text)
        else:
            p.add_argument(
                flag,
                type=lambda v, t=ann: None if v.lower() == "none" else t(v),
                default=None,
                metavar=getattr(ann, "__name__", "V").upper(),
                help=help_text,
            )

    def handler(args: argparse.Namespace, settings: object) -> int:
        import shlex
        import sys

        from pydantic import ValidationError

        from cryid.models.training.train import train

        given = {n: getattr(args, n) for n in TrainSettings.model_fields if getattr(args, n) is not None}
        try:
            config = TrainSettings(**given)
        except ValidationError as exc:
            raise _option_error(exc) from None
        command = "cryid " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
        result = train(config, args.data, args.out, init=args.init, command=command, progress=not args.quiet)
        figures = ", ".join(f"{k} {v:.4f}" for k, v in sorted(result.metrics.items()))
        print(f"{result.out_dir}: best epoch {result.best_epoch}" + (f" ({figures})" if figures else ""))
        print(
            f"next: cryid model export {result.out_dir} --out MODEL_DIR --calibrate-data {args.data} "
            "(export, then fit the score-to-probability map on infants not trained on)"
        )
        return 0

    p.set_defaults(func=handler)


def _register_eval(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """cryid eval --data DIR --split dev|test [--model DIR | --speechbrain SRC] ..."""
    from pathlib import Path

    p = sub.add_parser(
        "eval",
        help="CryCeleb2023 EER (paper protocol) and the ward's identification rates",
        description="Paper protocol: every cry of a (baby, period) concatenated in chronological order, one "
        "embedding, cosine B vs D for every pair of <split>_pairs.csv, EER as speechbrain's. Ward protocol: "
        "enroll each baby from its B files as `cryid enroll` does, identify each D file as the daemon does. "
        "Embeddings are cached per (model, file), so a second run is immediate.",
    )
    p.add_argument("--data", type=Path, required=True, help="CryCeleb-layout data set (holds metadata.csv)")
    p.add_argument("--split", required=True, choices=["dev", "test"], help="split to evaluate")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", type=Path, default=None, help="cryid model directory (default CRYID_MODEL)")
    which.add_argument(
        "--speechbrain",
        metavar="SRC",
        default=None,
        help="speechbrain model directory or hub id: the reference (train extra)",
    )
    p.add_argument("--protocol", choices=["pairs", "ward", "both"], default=None, help="protocols to run")
    p.add_argument("--tta", type=int, default=None, help="average the scores of N seeded shuffled orders")
    p.add_argument("--seed", type=int, default=None, help="seed of the --tta orders")
    p.add_argument("--score-norm", choices=["none", "asnorm"], default=None, help="normalise the pair scores")
    p.add_argument("--cohort", default=None, help="split of the same data set used as AS-norm cohort")
    p.add_argument("--cohort-top-k", type=int, default=None, help="AS-norm top-k cohort scores")
    p.add_argument("--room-size", type=int, default=None, help="ward protocol in seeded rooms of N babies")
    p.add_argument("--room-strangers", type=int, default=None, help="babies per room not enrolled")
    p.add_argument("--rooms", type=int, default=None, help="number of rooms with --room-size")
    p.add_argument(
        "--confirm",
        type=int,
        default=None,
        metavar="K",
        help="confirm K D files per enrolled baby, identify the rest",
    )
    p.add_argument(
        "--min-confidence",
        type=float,
        default=None,
        help="replace identifier.min_confidence for this run (default: the configuration's, as the daemon)",
    )
    p.add_argument("--bootstrap", type=int, default=None, help="infant resamples for the 95%% intervals")
    p.add_argument(
        "--ward-channel",
        type=int,
        default=None,
        metavar="SEED",
        help="pass every recording through one simulated ward channel (pyroomacoustics)",
    )
    p.add_argument("--json", type=Path, default=None, help="write every figure as JSON (fractions 0-1)")
    p.add_argument("--plot", type=Path, default=None, help="score histogram PNG (needs matplotlib)")
    p.add_argument("--submission", type=Path, default=None, help="CSV id,score for every pair")
    p.add_argument("--cache-dir", type=Path, default=None, help="embedding cache (~/.cache/cryid/embeddings)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")

    def handler(args: argparse.Namespace, settings: object) -> int:
        from pydantic import ValidationError

        from cryid.models.evaluation import outputs
        from cryid.models.evaluation.embedders import default_cache_dir, load_eval_embedder
        from cryid.models.evaluation.evaluate import EvalOptions, run_evaluation

        names = (
            "protocol",
            "tta",
            "seed",
            "score_norm",
            "cohort",
            "cohort_top_k",
            "room_size",
            "room_strangers",
            "rooms",
            "confirm",
            "min_confidence",
            "bootstrap",
            "ward_channel",
        )
        given = {k: getattr(args, k) for k in names}
        try:
            options = EvalOptions(split=args.split, **{k: v for k, v in given.items() if v is not None})
        except ValidationError as exc:
            raise _option_error(exc) from None
        if options.ward_channel is not None:
            try:
                import pyroomacoustics  # noqa: F401
            except ImportError:
                raise UsageError(
                    "--ward-channel needs pyroomacoustics, which is not installed; "
                    "pip install 'cryid[train]' (or pyroomacoustics)"
                ) from None
        if args.submission is not None and options.protocol == "ward":
            raise UsageError("--submission needs the paper protocol; drop --protocol ward")
        for option, path in (("--json", args.json), ("--plot", args.plot), ("--submission", args.submission)):
            if path is not None:
                outputs.check_output_path(path, option)
        if args.plot is not None:
            outputs.require_matplotlib()
        model_dir = args.model if args.model is not None else settings.model  # type: ignore[attr-defined]
        embedder = load_eval_embedder(
            None if args.speechbrain else model_dir,
            args.speechbrain,
            settings.embedder,  # type: ignore[attr-defined]
        )
        report = run_evaluation(
            args.data,
            options,
            embedder,
            embedder_name="speechbrain" if args.speechbrain else "onnx",
            model_label=str(args.speechbrain or model_dir),
            segmenter=settings.segmenter,  # type: ignore[attr-defined]
            cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
            rule=settings.identifier,  # type: ignore[attr-defined]  # the daemon's decision thresholds
        )
        for line in outputs.summary_lines(report):
            print(line)
        if args.submission is not None and report.pairs is not None:
            outputs.write_submission(report.pairs, args.submission)
            print(f"submission: {args.submission} ({report.pairs.pairs} pairs)")
        if args.plot is not None:
            outputs.plot_scores(report, args.plot)
            print(f"plot: {args.plot}")
        if args.json is not None:
            outputs.write_json(report, args.json)
            print(f"json: {args.json}")
        return 0

    p.set_defaults(func=handler)


def _calibration_row(cal: object) -> str:
    if cal is None:
        return "none: decisions need one (cryid model calibrate DIR --data DIR)"
    rec = cal.recommended_min_confidence  # type: ignore[attr-defined]
    return (
        f"{cal.method}, recommended min_confidence {rec if rec is not None else '-'}, "  # type: ignore[attr-defined]
        f"confirmed_weight {cal.confirmed_weight:g}, fitted {cal.fitted_at or '-'} on "  # type: ignore[attr-defined]
        f"{cal.data or '-'}"
    )  # type: ignore[attr-defined]


def _register_calibrate(msub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """cryid model calibrate DIR --data DIR [--split dev] [--room-size 8] [--rooms R] [--seed S] ..."""
    from pathlib import Path

    p = msub.add_parser(
        "calibrate",
        help="fit the score -> probability map of a model and store it in its manifest",
        description="Fits the probability that the best-scoring enrolled baby is the crying one, from the "
        "best score, the margin and the number of candidates, in seeded ward rooms (a quarter of each room "
        "not enrolled) of infants the model was not trained on, by cross-validation over infants. Chooses "
        "the recommended min_confidence (CV wrong-baby rate <= target in rooms of --room-size, with 0 and "
        "1 confirmed files) and confirmed_weight, then writes manifest.json's calibration (model.onnx "
        "is unchanged).",
    )
    p.add_argument("dir", metavar="DIR", type=Path, help="model directory (model.onnx + manifest.json)")
    p.add_argument("--data", type=Path, required=True, help="CryCeleb-layout data with B and D recordings")
    _add_calibrate_options(p)

    def handler(args: argparse.Namespace, settings: object) -> int:
        _run_calibration(args.dir, args.data, args, settings)
        return 0

    p.set_defaults(func=handler)
