"""The same recording given twice (issue 15, item 10) counts once toward ``registry.min_cry_s``, with a
warning naming both; a copy under another name, or re-encoded as FLAC, is the same recording.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from cryid.models.audio import load_audio
from cryid.models.config import DEFAULT_MODEL_DIR
from tests.fixtures.cli import cryid_env
from tests.fixtures.data import dac_rows

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`


def _cryid(state: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    e = cryid_env()
    e.update(CRYID_STATE_DIR=str(state), CRYID_MODEL=str(DEFAULT_MODEL_DIR), **env)
    return subprocess.run(
        [sys.executable, "-m", "cryid.daemon.cli", *args], env=e, capture_output=True, text=True, timeout=300
    )


def test_a_recording_given_twice_counts_once(tmp_path: Path, dac_dir: Path) -> None:
    row = next(r for r in dac_rows(split="dev", period="B") if r["baby_id"] == "dac0059")
    cry = dac_dir / row["file_name"]
    once = _cryid(tmp_path / "probe", "enroll", "add", "probe", str(cry), CRYID_REGISTRY__MIN_CRY_S="0")
    assert once.returncode == 0, once.stderr
    cry_s = float(re.search(r"([0-9.]+) s of cry", once.stdout).group(1))  # type: ignore[union-attr]
    assert cry_s > 0.2
    copy = tmp_path / "copy-of-the-same.wav"
    shutil.copy(cry, copy)
    flac = tmp_path / "same-as-flac.flac"
    sf.write(flac, load_audio(cry), 16000, format="FLAC", subtype="PCM_24")
    need = f"{1.5 * cry_s:.2f}"  # one recording is not enough, two would be
    for given in ([str(cry), str(cry)], [str(cry), str(copy)], [str(flac), str(cry)]):
        done = _cryid(tmp_path / "state", "enroll", "add", "dac0059", *given, CRYID_REGISTRY__MIN_CRY_S=need)
        assert done.returncode == 2, done.stdout
        assert "the same recording as" in done.stderr and "counted once" in done.stderr, done.stderr
        assert "enrollment needs at least" in done.stderr.strip().splitlines()[-1]
    # Enrolled once, then the same audio again through `update`: still refused as too little new cry.
    ok = _cryid(tmp_path / "state", "enroll", "add", "dac0059", str(cry), CRYID_REGISTRY__MIN_CRY_S="0")
    assert ok.returncode == 0, ok.stderr
    done = _cryid(
        tmp_path / "state", "enroll", "update", "dac0059", str(copy), str(cry), CRYID_REGISTRY__MIN_CRY_S=need
    )
    assert done.returncode == 2 and "counted once" in done.stderr, done.stderr
