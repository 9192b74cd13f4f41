"""Decision behaviour that survived mutation: provisional decisions weigh the whole episode so far, not
the last expiration alone; the thresholds are inclusive.

Public ``Identifier`` API only (constructor with plain centroids, ``process``, ``flush``): the episode
test uses the default settings and asserts on the best candidate, so it holds whatever the decision
rule on top of it is; the threshold test sets ``min_score``/``min_margin``, the cosine rule of a model
without a calibration.
"""

from __future__ import annotations

import numpy as np

from cryid.daemon.config import IdentifierSettings
from cryid.daemon.identifier import Identifier
from cryid.models.pipeline import EmbeddedExpiration
from cryid.models.segmenter import Expiration

SR = 16000
DIM = 80
ADA, BEN = np.eye(DIM, dtype=np.float32)[0], np.eye(DIM, dtype=np.float32)[1]


def _item(start_s: float, vec: np.ndarray) -> EmbeddedExpiration:
    start, end = round(start_s * SR), round((start_s + 0.7) * SR)
    return EmbeddedExpiration(Expiration(start, end, np.zeros(end - start, np.float32), -20.0), 2.0 * vec)


def test_provisional_decision_uses_the_episode_so_far() -> None:
    """Three expirations like ada, then one like ben, 0.3 s apart (one episode): every provisional
    result and the final one still put ada first; ben leads only when he has most of the episode."""
    ident = Identifier(IdentifierSettings(), {"ada": ADA, "ben": BEN}, SR)
    vectors = [ADA, ADA, ADA, BEN, BEN, BEN, BEN]
    provisional = []
    for i, vec in enumerate(vectors):
        out = ident.process(_item(i * 1.0, vec))
        assert [r.kind for r in out] == ["expiration"]
        provisional.append(out[0])
    assert len({r.episode_id for r in provisional}) == 1
    assert [r.n_expirations for r in provisional] == list(range(1, len(vectors) + 1))
    best = [r.match.best_baby_id for r in provisional]
    assert best[:4] == ["ada"] * 4, best  # the fourth expiration alone is ben's
    assert best[-1] == "ben", best  # four of seven are ben's
    (final,) = ident.flush()
    assert final.kind == "episode" and final.n_expirations == len(vectors)
    assert final.match.best_baby_id == "ben"


def test_a_cry_exactly_at_the_thresholds_is_named() -> None:
    """The configured thresholds are inclusive ("at least"): an expiration identical to ada's centroid
    scores exactly 1.0 with a margin of exactly 1.0 (exact in float32), so thresholds of exactly those
    values name ada, and anything above them does not."""
    refs = {"ada": ADA, "ben": BEN}
    for min_score, min_margin in ((1.0, 0.0), (0.0, 1.0), (1.0, 1.0)):
        at = Identifier(IdentifierSettings(min_score=min_score, min_margin=min_margin), refs, SR)
        (r,) = at.process(_item(0.0, ADA))
        assert (r.match.score, r.match.margin) == (1.0, 1.0)
        assert (r.match.decision, r.match.baby_id) == ("identified", "ada"), (min_score, min_margin)
    above = Identifier(IdentifierSettings(min_score=0.0, min_margin=1.0 + 1e-6), refs, SR)
    (r,) = above.process(_item(0.0, ADA))
    assert (r.match.decision, r.match.baby_id, r.match.best_baby_id) == ("unknown", None, "ada")
