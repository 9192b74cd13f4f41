"""Provisional decisions weigh the whole episode so far, not the last expiration alone.

Public ``Identifier`` API only (constructor, ``process``, ``flush``) with its default settings, and
assertions on the best candidate, so the test holds whatever the decision rule on top of it is.
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
