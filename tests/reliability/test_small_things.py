"""Small things of issue 15 (item 13): ``model info`` without the build machine's path, ``--plot`` behind
its own ``plot`` extra (not torch), the model card's speed as ``cryid eval`` measures it, and wording
(``1 baby``, ``6 babies ... (5 ids)``, sample numbering).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib

from cryid.enrollment.enroll import model_sha256
from cryid.enrollment.registry import NewSample, Registry, SampleEmbeddings
from cryid.models.config import DEFAULT_MODEL_DIR
from cryid.models.manifest import load_manifest

REPO = Path(__file__).resolve().parents[2]


def _babies(state: Path, n: int) -> None:
    sha = model_sha256(DEFAULT_MODEL_DIR)
    dim = load_manifest(DEFAULT_MODEL_DIR).embedding_dim
    rng = np.random.default_rng(1)
    with Registry.open(state) as reg, reg.write() as tx:
        for b in range(n):
            tx.insert_infant(f"b{b:02d}", "", "nursery")
            for _ in range(2):
                emb = SampleEmbeddings(
                    sha, rng.normal(size=(3, dim)).astype(np.float32), (0, 10, 20), (5, 15, 25)
                )
                tx.insert_sample(f"b{b:02d}", NewSample("file", "x.wav", "birth", 3.0, 1.0, 3, emb))


def test_model_info_shows_no_build_machine_path(cryid) -> None:
    rc, out, err = cryid("model", "info")
    assert rc == 0, err
    source = next(line for line in out.splitlines() if line.startswith("source"))
    assert "/work/" not in source and "ens8" in source, source


def test_plot_has_its_own_extra_without_torch() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("matplotlib") for d in extras["plot"])
    assert not any(d.startswith(("torch", "speechbrain")) for d in extras["plot"])


def test_plot_message_names_the_plot_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from cryid.models.errors import CryidError
    from cryid.models.evaluation.outputs import require_matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(CryidError, match=r"cryid\[plot\]"):
        require_matplotlib()


def test_model_card_speed_is_what_cryid_eval_measures() -> None:
    card = (REPO / "models" / "default" / "MODEL_CARD.md").read_text()
    assert "About 400 s" not in card
    assert "cryid eval" in card and "419 s of audio per second" in card


def test_wording_one_baby_and_every_clashing_id_counted(cryid, monkeypatch: pytest.MonkeyPatch) -> None:
    _babies(cryid.state_dir, 1)
    rc, out, err = cryid("enroll", "export", cryid.state_dir.parent / "one.json")
    assert rc == 0 and out.startswith("exported 1 baby (model"), out
    six_state = cryid.state_dir.parent / "six-state"
    _babies(six_state, 6)
    monkeypatch.setenv("CRYID_STATE_DIR", str(six_state))
    six = cryid.state_dir.parent / "six.json"
    assert cryid("enroll", "export", six)[0] == 0
    rc, out, err = cryid("enroll", "import", six)  # into the registry that holds the same six
    assert rc == 2
    assert "6 of the babies" in err and "b00, b01, b02, b03, b04 and 1 more" in err, err


def test_show_numbers_the_recordings_of_the_baby(cryid) -> None:
    _babies(cryid.state_dir, 2)
    rc, out, err = cryid("enroll", "show", "b01")
    assert rc == 0, err
    lines = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert lines[0].startswith("1. (sample id 3)") and lines[1].startswith("2. (sample id 4)"), out
