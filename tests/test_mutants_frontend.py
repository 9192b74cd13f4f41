"""Front-end behaviour that mutation testing showed unchecked (bench/mutation.py models/frontend.py).

No torch needed (``tests/test_frontend.py`` compares with speechbrain and needs the ``train`` extra):
the errors a caller gets are one line naming the problem, and sentence normalisation leaves every band
with a zero mean.
"""

from __future__ import annotations

import numpy as np
import pytest

from cryid.models.frontend import Fbank, features
from cryid.models.manifest import FrontendParams


def test_wrong_calls_are_one_line_naming_the_problem() -> None:
    with pytest.raises(ValueError, match=r"^expected a 1-D mono clip, got shape \(2, 16000\)$"):
        Fbank().features(np.zeros((2, 16000), dtype=np.float32))
    with pytest.raises(ValueError, match=r"^give FrontendParams or keyword overrides, not both$"):
        Fbank(FrontendParams(), n_mels=40)


def test_sentence_normalisation_leaves_each_band_with_a_zero_mean() -> None:
    wav = (0.1 * np.random.default_rng(4).standard_normal(16000)).astype(np.float32)
    feats = features(wav)
    assert feats.shape == (101, 80) and feats.dtype == np.float32
    np.testing.assert_allclose(feats.mean(axis=0), 0.0, atol=1e-4)
    assert float(np.abs(feats).max()) > 1.0  # not all zeros: the bands still vary over time
