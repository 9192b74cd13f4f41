"""Registry export/import behaviour that mutation testing showed unchecked (bench/mutation.py
enrollment/transfer.py).

A real registry (SQLite) exported with ``export_registry``, edited as a damaged or hand-made file
would be, and read back with ``read_export`` / ``import_registry``. The refusals are checked whole:
the one line a nurse or an admin reads must name the field, the value and the bound.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cryid.enrollment.config import RegistrySettings
from cryid.enrollment.enroll import EnrollmentError
from cryid.enrollment.registry import NewSample, Registry, SampleEmbeddings
from cryid.enrollment.transfer import MAX_EXPIRATIONS, export_registry, import_registry, read_export

SHA = "5" * 64
OTHER_SHA = "6" * 64
DIM = 8


@pytest.fixture()
def doc(tmp_path: Path) -> dict[str, Any]:
    """An export of one baby, ada, with one sample of two expirations."""
    with Registry.open(tmp_path / "source", RegistrySettings()) as reg:
        with reg.write() as tx:
            tx.insert_infant("ada", "Ada", "ward1")
            vectors = np.random.default_rng(0).normal(size=(2, DIM)).astype(np.float32)
            emb = SampleEmbeddings(SHA, vectors, (0, 9000), (8000, 17000))
            tx.insert_sample(
                "ada",
                NewSample(source_kind="file", source="ada.wav", period="birth", duration_s=2.0, cry_s=1.0,
                          n_expirations=2, embeddings=emb),
            )  # fmt: skip
        export_registry(reg, SHA, tmp_path / "export.json")
    return json.loads((tmp_path / "export.json").read_text())


def _refusal(tmp_path: Path, doc: dict[str, Any]) -> str:
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(EnrollmentError) as err:
        read_export(path, SHA, DIM)
    message = str(err.value)
    prefix, suffix = f"{path}: refused, nothing imported: ", "; export it again"
    assert message.startswith(prefix) and message.endswith(suffix), message
    return message[len(prefix) : -len(suffix)]


def _sample(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["infants"][0]["samples"][0]


WHERE = "infants[0] (baby ada)"


def _garble(e: dict[str, Any]) -> None:
    """One stray character in valid base64: lenient decoding would skip it and accept the file."""
    e["vectors_f32le"] = e["vectors_f32le"][:8] + "*" + e["vectors_f32le"][8:]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: _sample(d).update(period="later"),
         f"{WHERE}.samples[0].period: 'later' is not one of birth, discharge"),
        (lambda d: _sample(d).update(embeddings=[1, 2]),
         f"{WHERE}.samples[0].embeddings: must be an object, got list"),
        (lambda d: _sample(d)["embeddings"].update(end_samples=[0, 17000]),
         f"{WHERE}.samples[0].embeddings.end_samples[0]: 0 is not after its start 0"),
        (lambda d: _sample(d).update(n_expirations="2"),
         f"{WHERE}.samples[0].n_expirations: '2' is not a whole number of 0 to {MAX_EXPIRATIONS}"),
        (lambda d: d["infants"][0].update(room="icu 2"),
         f"{WHERE}.room: 'icu 2' is not a room name (1-64 letters, digits, '_', '-')"),
        (lambda d: d["infants"][0].update(samples={"0": {}}),
         f"{WHERE}.samples: must be a list of at most 1000 samples"),
        (lambda d: _garble(_sample(d)["embeddings"]),
         f"{WHERE}.samples[0].embeddings.vectors_f32le: is not valid base64"),
    ],
    ids=["period", "embeddings", "span", "count", "room", "samples", "base64"],
)  # fmt: skip
def test_a_bad_field_is_refused_with_a_line_naming_field_value_and_bound(
    doc: dict[str, Any], tmp_path: Path, edit: Any, expected: str
) -> None:
    edit(doc)
    assert _refusal(tmp_path, doc) == expected


def test_vector_norms_are_bounded_as_the_message_says(doc: dict[str, Any], tmp_path: Path) -> None:
    """Norms of 0.001 to 10000 are embeddings; 10000.5 is refused, 10000 is not."""
    e = _sample(doc)["embeddings"]

    def with_norm(norm: float) -> dict[str, Any]:
        edited = copy.deepcopy(doc)
        v = np.zeros((2, DIM), "<f4")
        v[:, 0] = [1.0, norm]
        _sample(edited)["embeddings"] = e | {"vectors_f32le": base64.b64encode(v.tobytes()).decode()}
        return edited

    path = tmp_path / "at-bound.json"
    path.write_text(json.dumps(with_norm(1e4)))
    (infant,) = read_export(path, SHA, DIM)
    assert float(np.linalg.norm(infant.samples[0].embeddings.vectors[1])) == 1e4
    assert _refusal(tmp_path, with_norm(10000.5)) == (
        f"{WHERE}.samples[0].embeddings.vectors_f32le[1]: not a usable embedding (norm 1e+04, finite True); "
        "embeddings have finite values and a norm of 0.001 to 10000"
    )


def test_the_largest_sample_allowed_imports_one_more_expiration_does_not(
    doc: dict[str, Any], tmp_path: Path
) -> None:
    def with_expirations(n: int) -> dict[str, Any]:
        edited = copy.deepcopy(doc)
        s = _sample(edited)
        s.update(duration_s=3600.0, cry_s=3600.0)
        v = np.zeros((n, DIM), "<f4")
        v[:, 0] = 1.0
        s["embeddings"] = {
            "start_samples": list(range(0, 2 * n, 2)), "end_samples": list(range(1, 2 * n, 2)), "dim": DIM,
            "vectors_f32le": base64.b64encode(v.tobytes()).decode(),
        }  # fmt: skip
        return edited

    path = tmp_path / "largest.json"
    path.write_text(json.dumps(with_expirations(MAX_EXPIRATIONS)))
    (infant,) = read_export(path, SHA, DIM)
    assert infant.samples[0].embeddings.vectors.shape == (MAX_EXPIRATIONS, DIM)
    assert _refusal(tmp_path, with_expirations(MAX_EXPIRATIONS + 1)) == (
        f"{WHERE}.samples[0].embeddings: {MAX_EXPIRATIONS + 1} expirations, at most {MAX_EXPIRATIONS}"
    )


def test_a_sample_without_expirations_imports(doc: dict[str, Any], tmp_path: Path) -> None:
    """A baby that needs re-enrollment travels with samples that have no embeddings for the model."""
    _sample(doc).update(n_expirations=0, cry_s=0.0, embeddings=None)
    path = tmp_path / "no-expirations.json"
    path.write_text(json.dumps(doc))
    with Registry.open(tmp_path / "ward", RegistrySettings()) as reg:
        assert import_registry(reg, path, SHA, dim=DIM) == 1
        (sample,) = reg.samples("ada")
        assert (sample.n_expirations, sample.models) == (0, ())
        assert reg.needs_reenrollment(SHA) == ["ada"]


def test_an_export_of_another_model_names_both_models(doc: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "export.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(EnrollmentError) as err:
        read_export(path, OTHER_SHA, DIM)
    assert str(err.value) == (
        f"{path}: exported with model '555555555555', this cryid uses 666666666666; set CRYID_MODEL to the "
        "same model as the exporting PC, or re-enroll the babies"
    )


def test_an_export_that_cannot_be_written_names_the_path_and_the_fix(tmp_path: Path) -> None:
    out = tmp_path / "no-such-dir" / "export.json"
    with Registry.open(tmp_path / "state", RegistrySettings()) as reg, pytest.raises(EnrollmentError) as err:
        export_registry(reg, SHA, out)
    assert re.fullmatch(
        rf"cannot write export {re.escape(str(out))} \(\[Errno 2\] .+\); choose a writable path",
        str(err.value),
    ), str(err.value)
    assert not out.parent.exists()
