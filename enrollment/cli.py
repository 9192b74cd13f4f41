"""``cryid enroll add|record|list|show|remove|update|move|reembed|export|import``: the nurse's commands.

Handlers get ``(args, settings)``; bad input raises a ``ValueError`` that ``cryid`` prints as one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cryid.enrollment import enroll, transfer
from cryid.enrollment.config import EnrollmentSettings, RegistryPlace
from cryid.enrollment.registry import (
    PERIODS,
    Registry,
    check_baby_id,
    check_display_name,
    check_room,
    utc_now,
)

if TYPE_CHECKING:
    from cryid.models.embedder import Embedder


def _n(count: int, one: str, many: str) -> str:
    """``1 baby``, ``2 babies``."""
    return f"{count} {one if count == 1 else many}"


def _safe(text: str) -> str:
    """Text from the registry for a terminal: control characters (escape sequences) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _registry(settings: RegistryPlace) -> Registry:
    return Registry.open(settings.state_dir, settings.registry)


def _embedder(settings: EnrollmentSettings) -> Embedder:
    from cryid.models.embedder import Embedder

    return Embedder(settings.model, settings.embedder)


def _keep_audio(args: argparse.Namespace, settings: RegistryPlace) -> bool:
    return settings.registry.keep_audio if args.keep_audio is None else bool(args.keep_audio)


def _report(result: enroll.EnrollResult, verb: str, settings: RegistryPlace) -> None:
    print(
        f"{verb} {result.baby_id}: {_n(result.n_samples, 'recording', 'recordings')}, "
        f"{result.cry_s:.1f} s of cry in {_n(result.n_expirations, 'expiration', 'expirations')} "
        f"(model {result.model_sha256[:12]})"
    )
    for c in result.confusable:
        print(
            f"cryid: warning: {result.baby_id} is {c.similarity:.3f} similar to {c.baby_id} "
            f"(>= registry.confusable_similarity {settings.registry.confusable_similarity}); "
            "the daemon may confuse them: enroll more crying of both",
            file=sys.stderr,
        )


def _add(args: argparse.Namespace, settings: EnrollmentSettings) -> int:
    baby_id = check_baby_id(args.baby_id)
    check_display_name(args.name)
    with _registry(settings) as reg:
        enroll.ensure_can_add(reg, baby_id, args.replace)
        samples = enroll.prepare_files(
            [Path(p) for p in args.audio], period=args.period, segmenter=settings.segmenter,
            embedder_factory=lambda: _embedder(settings), keep_audio=_keep_audio(args, settings),
        )
        result = enroll.add(
            reg, baby_id, samples, settings.registry, room=args.room or settings.room,
            display_name=args.name, replace=args.replace,
        )
    _report(result, "re-enrolled" if result.replaced else "enrolled", settings)
    return 0


def _update(args: argparse.Namespace, settings: EnrollmentSettings) -> int:
    baby_id = check_baby_id(args.baby_id)
    with _registry(settings) as reg:
        enroll.ensure_can_update(reg, baby_id)
        samples = enroll.prepare_files(
            [Path(p) for p in args.audio], period=args.period, segmenter=settings.segmenter,
            embedder_factory=lambda: _embedder(settings), keep_audio=_keep_audio(args, settings),
        )
        result = enroll.update(reg, baby_id, samples, settings.registry)
    _report(result, "updated", settings)
    return 0


def _record(args: argparse.Namespace, settings: EnrollmentSettings) -> int:
    from cryid.models.audio import record

    baby_id = check_baby_id(args.baby_id)
    check_display_name(args.name)
    device = int(args.device) if args.device is not None and args.device.isdigit() else args.device
    with _registry(settings) as reg:
        if args.update:
            enroll.ensure_can_update(reg, baby_id)
        else:
            enroll.ensure_can_add(reg, baby_id, args.replace)
        embedder = _embedder(settings)
        where = device if device is not None else "default"
        print(f"recording {args.seconds:g} s from input device {where}...", file=sys.stderr)
        wav = record(args.seconds, device)
        sample = enroll.prepare_recording(
            wav, source_kind="mic", source=f"mic {device if device is not None else 'default'} {utc_now()}",
            period=args.period, segmenter=settings.segmenter, embedder=embedder,
            keep_audio=_keep_audio(args, settings),
        )
        if args.update:
            result = enroll.update(reg, baby_id, [sample], settings.registry)
        else:
            result = enroll.add(
                reg, baby_id, [sample], settings.registry, room=args.room or settings.room,
                display_name=args.name, replace=args.replace,
            )
    _report(result, "updated" if args.update else "enrolled", settings)
    return 0


def _model_sha_or_none(settings: EnrollmentSettings) -> str | None:
    try:
        return enroll.model_sha256(settings.model)
    except ValueError:
        return None


def _list(args: argparse.Namespace, settings: EnrollmentSettings) -> int:
    sha = _model_sha_or_none(settings)
    with _registry(settings) as reg:
        rows = enroll.list_infants(reg, sha)
    if args.json:
        print(json.dumps({"model_sha256": sha, "infants": [dataclasses.asdict(r) for r in rows]}, indent=2))
        return 0
    if not rows:
        print("no babies enrolled; enroll one with `cryid enroll add BABY_ID AUDIO...`")
        return 0
    head = ("BABY_ID", "NAME", "ROOM", "STATUS", "SAMPLES", "CRY_S", "ENROLLED", "NOTE")
    table = [head] + [
        (
            r.baby_id, _safe(r.display_name) or "-", _safe(r.room), r.status, str(r.n_samples),
            f"{r.cry_s:.1f}",
            r.created_at[:16].replace("T", " "),
            "needs re-enrollment" if r.needs_reenrollment else ("audio kept" if r.audio_kept else ""),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if sha is None:
        print(f"(model {settings.model} not readable: re-enrollment needs not checked)", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace, settings: EnrollmentSettings) -> int:
    check_baby_id(args.baby_id)
    sha = enroll.model_sha256(settings.model)
    with _registry(settings) as reg:
        rep = enroll.show(reg, args.baby_id, sha)
    if args.json:
        print(json.dumps(dataclasses.asdict(rep), indent=2))
        return 0
    i = rep.infant
    name = f' "{_safe(i.display_name)}"' if i.display_name else ""
    print(
        f"{i.baby_id}{name}: {i.status}, room {_safe(i.room)}, enrolled {_safe(i.created_at)}, "
        f"updated {_safe(i.updated_at)}"
    )
    print(
        f"recordings: {len(rep.samples)}, {rep.cry_s:.1f} s of cry in "
        f"{_n(rep.n_expirations, 'expiration', 'expirations')}"
    )
    for k, s in enumerate(rep.samples, 1):
        models = ", ".join(m[:12] for m in s.models) or "none"
        print(
            f"  {k}. (sample id {s.sample_id}) {s.period} {s.source_kind} {_safe(s.source)}: "
            f"{s.duration_s:.1f} s audio, "
            f"{s.cry_s:.1f} s cry, {s.n_expirations} expirations, "
            f"audio {'kept' if s.has_audio else 'not kept'}, models {models}"
        )
    print(
        f"current model {sha[:12]}: {rep.n_embedded} expiration embeddings, "
        f"{rep.n_confirmed} confirmed by nurses"
    )
    if rep.mean_cosine_to_centroid is not None:
        print(
            f"centroid quality: mean cosine of expirations to centroid {rep.mean_cosine_to_centroid:.3f} "
            f"(lowest {rep.min_cosine_to_centroid:.3f})"
        )
    if rep.nearest is not None:
        print(f"nearest other baby: {rep.nearest.baby_id} (cosine {rep.nearest.similarity:.3f})")
    if rep.needs_reenrollment:
        readd = f"`cryid enroll add {i.baby_id} AUDIO... --replace`"
        fix = "`cryid enroll reembed`" if rep.can_reembed else readd
        print(f"needs re-enrollment: yes, no embeddings for the current model; run {fix}")
    else:
        print("needs re-enrollment: no")
    from cryid.enrollment import cli_feedback  # confirm|reject|undo|episodes live there

    print(f"confirmations: {len(rep.feedback)}" + ("" if rep.feedback else " (`cryid enroll confirm`)"))
    for f in rep.feedback:
        print("  " + cli_feedback.describe(f))
    return 0


def _remove(args: argparse.Namespace, settings: EnrollmentSettings) -> int:
    check_baby_id(args.baby_id)
    with _registry(settings) as reg:
        what = enroll.remove(reg, args.baby_id, purge=args.purge)
    print(f"{what} {args.baby_id}")
    return 0


def _move(args: argparse.Namespace, settings: EnrollmentSettings) -> int:
    baby_id, room = check_baby_id(args.baby_id), check_room(args.room)
    with _registry(settings) as reg, reg.write() as tx:
        old = tx.set_room(baby_id, room)
    if old == room:
        print(f"{baby_id} is already in room {room}")
    else:
        print(f"moved {baby_id} from room {old} to room {room}")
    return 0


def _reembed(args: argparse.Namespace, settings: EnrollmentSettings) -> int:
    with _registry(settings) as reg:
        res = enroll.reembed(reg, settings.segmenter, _embedder(settings))
    print(
        f"re-embedded {_n(res.n_samples, 'recording', 'recordings')} of "
        f"{_n(len(res.babies), 'baby', 'babies')} for model {res.model_sha256[:12]}"
    )
    if res.failed_samples:
        ids = ", ".join(str(i) for i in res.failed_samples)
        print(
            f"cryid: warning: no cry found again in the kept audio of sample id(s) {ids} "
            "(see `cryid enroll show BABY_ID`); they keep their old embeddings only",
            file=sys.stderr,
        )
    if res.needs_reenrollment:
        print(
            "cryid: warning: audio not kept, these babies need re-enrollment: "
            + ", ".join(res.needs_reenrollment),
            file=sys.stderr,
        )
    return 0


def _export(args: argparse.Namespace, settings: EnrollmentSettings) -> int:
    sha = enroll.model_sha256(settings.model)
    with _registry(settings) as reg:
        n = transfer.export_registry(reg, sha, args.file)
    print(f"exported {_n(n, 'baby', 'babies')} (model {sha[:12]}) to {args.file}")
    return 0


def _import(args: argparse.Namespace, settings: EnrollmentSettings) -> int:
    from cryid.models.manifest import load_manifest

    sha = enroll.model_sha256(settings.model)
    dim = load_manifest(Path(settings.model)).embedding_dim
    with _registry(settings) as reg:
        n = transfer.import_registry(reg, args.file, sha, replace=args.replace, dim=dim)
    print(f"imported {_n(n, 'baby', 'babies')} from {args.file}")
    return 0


def _add_sample_options(p: argparse.ArgumentParser, period_default: str) -> None:
    p.add_argument("--period", choices=PERIODS, default=period_default, help="When the cries were recorded.")
    p.add_argument(
        "--keep-audio", action=argparse.BooleanOptionalAction, default=None,
        help="Store the recording in the registry (privacy: see docs/enrollment.md; enables `reembed`). "
        "Default: registry.keep_audio.",
    )


def _add_new_baby_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="", help="Display name for the ward dashboard.")
    p.add_argument("--room", default=None, help="Room (default: the configured room).")
    p.add_argument("--replace", action="store_true", help="Start an already enrolled baby over.")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``enroll`` to ``cryid``'s parser."""
    p = sub.add_parser("enroll", help="Enroll newborns: add, record, list, show, remove, update, move, ...")
    esub = p.add_subparsers(dest="enroll_command", metavar="ACTION", required=True)

    a = esub.add_parser("add", help="Enroll a baby from recordings of its cry.")
    a.add_argument("baby_id", metavar="BABY_ID")
    a.add_argument("audio", metavar="AUDIO", nargs="+", type=Path, help="WAV/FLAC/... recordings.")
    _add_new_baby_options(a)
    _add_sample_options(a, "birth")
    a.set_defaults(func=_add)

    r = esub.add_parser("record", help="Enroll a baby live from the microphone.")
    r.add_argument("baby_id", metavar="BABY_ID")
    r.add_argument("--seconds", type=float, required=True, help="How long to record.")
    r.add_argument("--device", default=None, help="Input device index or name (see `cryid devices`).")
    r.add_argument("--update", action="store_true", help="Add the recording to an enrolled baby.")
    _add_new_baby_options(r)
    _add_sample_options(r, "birth")
    r.set_defaults(func=_record)

    ls = esub.add_parser("list", help="Enrolled babies.")
    ls.add_argument("--json", action="store_true", help="JSON instead of a table.")
    ls.set_defaults(func=_list)

    s = esub.add_parser("show", help="One baby: samples, cry seconds, centroid quality, nearest other baby.")
    s.add_argument("baby_id", metavar="BABY_ID")
    s.add_argument("--json", action="store_true", help="JSON instead of text.")
    s.set_defaults(func=_show)

    rm = esub.add_parser("remove", help="Discharge a baby (record kept) or delete it with --purge.")
    rm.add_argument("baby_id", metavar="BABY_ID")
    rm.add_argument("--purge", action="store_true", help="Delete the baby, its samples and embeddings.")
    rm.set_defaults(func=_remove)

    u = esub.add_parser("update", help="Add recordings to an enrolled baby (e.g. --period discharge).")
    u.add_argument("baby_id", metavar="BABY_ID")
    u.add_argument("audio", metavar="AUDIO", nargs="+", type=Path)
    _add_sample_options(u, "birth")
    u.set_defaults(func=_update)

    mv = esub.add_parser("move", help="Move a baby to another room (the daemons follow within a second).")
    mv.add_argument("baby_id", metavar="BABY_ID")
    mv.add_argument("room", metavar="ROOM")
    mv.set_defaults(func=_move)

    re = esub.add_parser("reembed", help="Rebuild every embedding for the current model from kept audio.")
    re.set_defaults(func=_reembed)

    ex = esub.add_parser("export", help="Write the registry (with the model sha) to a file.")
    ex.add_argument("file", metavar="FILE", type=Path)
    ex.set_defaults(func=_export)

    im = esub.add_parser("import", help="Add the babies of an export file (same model, same schema).")
    im.add_argument("file", metavar="FILE", type=Path)
    im.add_argument("--replace", action="store_true", help="Overwrite babies already enrolled.")
    im.set_defaults(func=_import)

    from cryid.enrollment import cli_feedback

    cli_feedback.register(esub)  # confirm, reject, undo, episodes
