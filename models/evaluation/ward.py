"""Simulated ward rooms: who is enrolled, who cries, and what the daemon would decide.

A room holds ``size`` babies drawn (seeded) from the split's infants with B and D recordings; all but
``strangers`` of them are enrolled from their B (birth) files, as ``cryid enroll`` does. Every D file of
the room's babies is a query, pooled like a daemon episode (``scoring.centroid`` of its expiration
embeddings) and scored through ``scoring.ReferenceSet`` against the room's enrolled babies only. A
stranger's cry can only be "unknown"; naming anyone for it is a wrong baby. With ``confirm`` K, K of
each enrolled baby's D files are confirmed by a nurse (their embeddings form the baby's confirmed
reference) and only its other D files are queries.

Figures (all optionally weighted per query, which the infant bootstrap uses):
- top-1 / top-5 among the enrolled, over the enrolled babies' queries;
- under the daemon's decision rule (``decision.names_best`` with the ``identifier.*`` thresholds: a query is
  named when the calibrated probability of its best candidate reaches ``min_confidence`` if that baby has
  a confirmed reference, else ``min_confidence_unconfirmed``): **coverage**, the share of enrolled babies'
  queries that get a name, and the **wrong-baby rate**, the share of named queries whose name is not the
  crying baby (every named stranger counts);
- the open-set EER of every (query, enrolled baby) score.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from cryid.models.calibration import Calibration
from cryid.models.decision import NamingRule, NamingThresholds, names_best
from cryid.models.errors import UsageError
from cryid.models.evaluation.metrics import eer, weighted_eer
from cryid.models.scoring import ReferenceSet, centroid

CURVE = tuple(round(float(x), 2) for x in np.arange(0.05, 0.991, 0.01))  # min_confidence grid


def _seed_of(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


@dataclass(frozen=True)
class WardData:
    """A split's expiration embeddings as the ward sees them.

    ``birth``: each baby whose B files hold an expiration -> its birth centroid (enrollment).
    ``d_files``: each baby -> the expiration embeddings of each of its D files that holds one.
    ``pool``: the babies with both B and D recordings (those rooms are drawn from), sorted.
    """

    birth: Mapping[str, np.ndarray]
    d_files: Mapping[str, Sequence[np.ndarray]]
    pool: tuple[str, ...]

    @classmethod
    def build(
        cls, b_files: Mapping[str, Sequence[np.ndarray]], d_files: Mapping[str, Sequence[np.ndarray]]
    ) -> WardData:
        """From each baby's per-file expiration embeddings ((n, dim) arrays; n may be 0)."""
        birth = {}
        for baby, files in b_files.items():
            embs = [e for e in files if e.shape[0] > 0]
            if embs:
                birth[baby] = centroid(np.concatenate(embs))
        d = {baby: [e for e in files if e.shape[0] > 0] for baby, files in d_files.items()}
        return cls(birth=birth, d_files=d, pool=tuple(sorted(set(b_files) & set(d_files))))


@dataclass(frozen=True)
class Room:
    """The enrolled babies of a room and the others whose cries it hears."""

    enrolled: tuple[str, ...]
    strangers: tuple[str, ...]


def whole_ward(data: WardData) -> list[Room]:
    """One room: every baby with a birth reference enrolled, every other baby with D files a stranger."""
    enrolled = tuple(sorted(data.birth))
    return [Room(enrolled, tuple(sorted(set(data.d_files) - set(enrolled))))]


def draw_rooms(data: WardData, size: int, strangers: int, count: int, seed: int) -> list[Room]:
    """``count`` seeded rooms of ``size`` babies from ``data.pool``, the last ``strangers`` not enrolled.
    A baby drawn for enrollment whose B files hold no expiration stays a stranger (as ``enroll`` refuses)."""
    if not 1 <= size <= len(data.pool):
        raise UsageError(
            f"a room of {size} babies needs {size} infants with B and D recordings; "
            f"the split has {len(data.pool)}"
        )
    if not 0 <= strangers < size:
        raise UsageError(f"a room of {size} babies cannot hold {strangers} strangers; give fewer")
    rng = np.random.default_rng(seed)
    rooms = []
    for _ in range(count):
        babies = [data.pool[i] for i in rng.choice(len(data.pool), size, replace=False)]
        chosen = babies[: size - strangers]
        enrolled = tuple(b for b in chosen if b in data.birth)
        rooms.append(Room(enrolled, tuple(b for b in babies if b not in enrolled)))
    return rooms


@dataclass(frozen=True)
class RoomQueries:
    """Every scored query of a set of rooms, one row each."""

    infant: np.ndarray  # true baby id (str)
    room: np.ndarray  # room index
    enrolled: np.ndarray  # bool: the crying baby is enrolled in the room
    true_index: np.ndarray  # column of the crying baby in its row's scores; -1 for a stranger
    best: np.ndarray  # best score
    margin: np.ndarray  # best minus runner-up (0 with one candidate)
    n_candidates: np.ndarray
    scores: tuple[np.ndarray, ...]  # each row's scores against the room's enrolled babies
    best_confirmed: np.ndarray  # bool: the best candidate has a confirmed reference
    runner_confirmed: np.ndarray  # bool: the runner-up has one (false with one candidate)
    n_expirations: np.ndarray  # expirations pooled into the query
    others_mean: np.ndarray  # mean score of the candidates other than the best (the best's with one)

    def __len__(self) -> int:
        return int(self.infant.size)

    @cached_property
    def correct(self) -> np.ndarray:
        """The best candidate is the crying baby (always false for a stranger)."""
        top = np.array([int(np.argmax(s)) if s.size else -1 for s in self.scores], dtype=np.int64)
        return self.enrolled & (top == self.true_index)

    @cached_property
    def rank(self) -> np.ndarray:
        """Candidates scoring strictly above the crying baby (ties in its favour); -1 for a stranger."""
        return np.array(
            [
                int((s > s[t]).sum()) if t >= 0 else -1
                for s, t in zip(self.scores, self.true_index, strict=True)
            ],
            dtype=np.int64,
        )

    @cached_property
    def targets(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return _target_scores(self)

    def subset(self, mask: np.ndarray) -> RoomQueries:
        idx = np.flatnonzero(mask)
        return RoomQueries(
            self.infant[idx],
            self.room[idx],
            self.enrolled[idx],
            self.true_index[idx],
            self.best[idx],
            self.margin[idx],
            self.n_candidates[idx],
            tuple(self.scores[i] for i in idx),
            self.best_confirmed[idx],
            self.runner_confirmed[idx],
            self.n_expirations[idx],
            self.others_mean[idx],
        )

    @staticmethod
    def concat(parts: Sequence[RoomQueries]) -> RoomQueries:
        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in parts])

        return RoomQueries(
            cat("infant"),
            cat("room"),
            cat("enrolled"),
            cat("true_index"),
            cat("best"),
            cat("margin"),
            cat("n_candidates"),
            tuple(s for p in parts for s in p.scores),
            cat("best_confirmed"),
            cat("runner_confirmed"),
            cat("n_expirations"),
            cat("others_mean"),
        )


def score_rooms(
    data: WardData,
    rooms: Sequence[Room],
    confirm: int = 0,
    confirmed_weight: float = 0.75,
    seed: int = 0,
    confirm_share: float = 1.0,
    prefixes: bool = False,
) -> RoomQueries:
    """Score every query of every room (see the module docstring); confirmations are seeded per room.

    ``confirm_share``: the share of each room's enrolled babies that get their ``confirm`` confirmed files
    (seeded; 1: all of them), so a room mixes babies with and without a confirmed reference.
    ``prefixes``: each query pools only a seeded random leading run of 1 to n of its file's n expirations,
    as a daemon episode seen after its first expirations (else the whole file)."""
    rows: dict[str, list] = {
        k: [] for k in ("infant", "room", "enrolled", "true_index", "scores", "has", "n_exp")
    }
    for r, room in enumerate(rooms):
        if not room.enrolled:
            continue
        rng = np.random.default_rng([seed, confirm, r])
        share = rng.random(len(room.enrolled)) < confirm_share if confirm_share < 1.0 else None
        confirmed, held_out = {}, {}
        for j, baby in enumerate(room.enrolled):
            files = data.d_files.get(baby, [])
            pick = (
                set(rng.choice(len(files), min(confirm, len(files)), replace=False).tolist())
                if confirm and files and (share is None or share[j])
                else set()
            )
            if pick:
                confirmed[baby] = centroid(np.concatenate([files[i] for i in sorted(pick)]))
            held_out[baby] = pick
        refs = ReferenceSet({b: data.birth[b] for b in room.enrolled}, confirmed, confirmed_weight)
        column = {b: i for i, b in enumerate(refs.ids)}
        has = np.array([b in confirmed for b in refs.ids], dtype=bool)
        prefix_rng = np.random.default_rng([seed, confirm, r, 1])
        queries, truth, n_exp = [], [], []
        for baby in (*room.enrolled, *room.strangers):
            for i, emb in enumerate(data.d_files.get(baby, [])):
                if i not in held_out.get(baby, ()):
                    n = int(prefix_rng.integers(1, emb.shape[0] + 1)) if prefixes else emb.shape[0]
                    queries.append(centroid(emb[:n]))
                    truth.append(baby)
                    n_exp.append(n)
        if not queries:
            continue
        matrix = refs.score_matrix(np.stack(queries)).astype(np.float64)
        rows["infant"] += truth
        rows["room"] += [r] * len(truth)
        rows["enrolled"] += [b in column for b in truth]
        rows["true_index"] += [column.get(b, -1) for b in truth]
        rows["scores"] += list(matrix)
        rows["has"] += [has] * len(truth)
        rows["n_exp"] += n_exp
    scores = tuple(rows["scores"])
    orders = [np.argsort(-s, kind="stable") for s in scores]
    best = np.array([s[o[0]] for s, o in zip(scores, orders, strict=True)], dtype=np.float64)
    margin = np.array(
        [s[o[0]] - s[o[1]] if o.size > 1 else 0.0 for s, o in zip(scores, orders, strict=True)],
        dtype=np.float64,
    )
    others = np.array(
        [
            (s.sum() - s[o[0]]) / (s.size - 1) if s.size > 1 else s[o[0]]
            for s, o in zip(scores, orders, strict=True)
        ],
        dtype=np.float64,
    )
    has_rows = rows["has"]
    return RoomQueries(
        infant=np.array(rows["infant"], dtype=str),
        room=np.array(rows["room"], dtype=np.int64),
        enrolled=np.array(rows["enrolled"], dtype=bool),
        true_index=np.array(rows["true_index"], dtype=np.int64),
        best=best,
        margin=margin,
        n_candidates=np.array([s.size for s in scores], dtype=np.int64),
        scores=scores,
        best_confirmed=np.array([h[o[0]] for h, o in zip(has_rows, orders, strict=True)], dtype=bool),
        runner_confirmed=np.array(
            [bool(h[o[1]]) if o.size > 1 else False for h, o in zip(has_rows, orders, strict=True)],
            dtype=bool,
        ),
        n_expirations=np.array(rows["n_exp"], dtype=np.int64),
        others_mean=others,
    )


# figures --------------------------------------------------------------------------------------------
def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def top_k(q: RoomQueries, k: int, weights: np.ndarray | None = None) -> float | None:
    """Share of the enrolled babies' queries whose baby is among the ``k`` best candidates."""
    w = np.ones(len(q)) if weights is None else weights
    hit = (q.rank >= 0) & (q.rank < k)
    return _ratio(float(np.sum(w * hit)), float(np.sum(w * q.enrolled)))


def coverage(q: RoomQueries, named: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """Share of the enrolled babies' queries that get a name."""
    w = np.ones(len(q)) if weights is None else weights
    return _ratio(float(np.sum(w * (named & q.enrolled))), float(np.sum(w * q.enrolled)))


def wrong_rate(
    q: RoomQueries, named: np.ndarray, weights: np.ndarray | None = None, correct: np.ndarray | None = None
) -> float | None:
    """Share of the named queries whose name is not the crying baby (a named stranger is wrong)."""
    w = np.ones(len(q)) if weights is None else weights
    ok = q.correct if correct is None else correct
    return _ratio(float(np.sum(w * (named & ~ok))), float(np.sum(w * named)))


def target_scores(q: RoomQueries) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scores of each query against its own baby and against the others, with each score's query row."""
    return q.targets


def _target_scores(q: RoomQueries) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    tgt, tgt_row, non, non_row = [], [], [], []
    for i, (s, t) in enumerate(zip(q.scores, q.true_index, strict=True)):
        mask = np.ones(s.size, dtype=bool)
        if t >= 0:
            tgt.append(s[t])
            tgt_row.append(i)
            mask[t] = False
        non.extend(s[mask].tolist())
        non_row.extend([i] * int(mask.sum()))
    return (
        np.array(tgt, np.float64),
        np.array(tgt_row, np.int64),
        np.array(non, np.float64),
        np.array(non_row, np.int64),
    )


def open_set_eer(q: RoomQueries, weights: np.ndarray | None = None) -> float | None:
    """EER of the (query, enrolled baby) scores: speechbrain's ``eer`` unweighted, else ``weighted_eer``."""
    tgt, tgt_row, non, non_row = target_scores(q)
    if tgt.size == 0 or non.size == 0:
        return None
    if weights is None:
        return eer(tgt, non)[0]
    return weighted_eer(tgt, non, weights[tgt_row], weights[non_row])


def query_confidences(q: RoomQueries, calibration: Calibration) -> np.ndarray:
    """The calibrated confidence of every query's best candidate, from every input the map uses."""
    return calibration.confidences(
        q.best,
        q.margin,
        q.n_candidates,
        best_confirmed=q.best_confirmed,
        runner_confirmed=q.runner_confirmed,
        expirations=q.n_expirations,
        others_mean=q.others_mean,
    )


def daemon_margin(q: RoomQueries) -> np.ndarray:
    """Best minus runner-up as the daemon's identifier takes it: the best score itself with one candidate."""
    return np.where(q.n_candidates > 1, q.margin, q.best)


def named_mask(q: RoomQueries, calibration: Calibration, rule: NamingThresholds) -> np.ndarray:
    """Queries the daemon would name under ``rule`` (``decision.names_best``: the best candidate's
    calibrated confidence reaches ``min_confidence`` if it has a confirmed reference, else
    ``min_confidence_unconfirmed``, and any ``min_score``/``min_margin`` is met)."""
    return _named(q, query_confidences(q, calibration), rule)


def _named(q: RoomQueries, p: np.ndarray, rule: NamingThresholds) -> np.ndarray:
    return names_best(rule, p, q.best_confirmed, q.best, daemon_margin(q)) & (q.n_candidates > 0)


def operating_curve(q: RoomQueries, p: np.ndarray, rule: NamingThresholds) -> list[dict[str, float | None]]:
    """Coverage and wrong-baby rate with ``rule``'s min_confidence set to every ``CURVE`` value (its other
    thresholds as they are), for confidences ``p``."""
    correct = q.correct
    base = NamingRule.of(rule)
    out = []
    for t in CURVE:
        named = _named(q, p, replace(base, min_confidence=t))
        out.append(
            {
                "min_confidence": t,
                "coverage": coverage(q, named),
                "wrong_rate": wrong_rate(q, named, correct=correct),
                "named": int(named.sum()),
            }
        )
    return out
