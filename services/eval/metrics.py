"""Retrieval metrics over ranked result lists, each stated exactly (full-ranking AP vs AP@k, ...).

A ranking is a boolean array: rel[i] is True when the i-th result (0-based) is relevant.
`n_relevant` is the number of relevant items in the whole database for that query, so a
relevant item the search never returned counts as missed rather than being ignored.
"""

from __future__ import annotations

import numpy as np


def _rel(rel) -> np.ndarray:
    return np.asarray(rel, dtype=bool)


def average_precision(rel, n_relevant: int) -> float:
    """AP over the full ranking: mean over ALL relevant items of the precision at their rank
    (an item never returned contributes 0)."""
    rel = _rel(rel)
    if n_relevant <= 0:
        raise ValueError("average precision needs at least one relevant item")
    if rel.sum() > n_relevant:
        raise ValueError(f"ranking holds {int(rel.sum())} relevant items, more than n_relevant={n_relevant}")
    hits = np.flatnonzero(rel)
    return float(np.sum(np.arange(1, len(hits) + 1) / (hits + 1)) / n_relevant)


def average_precision_at_k(rel, n_relevant: int, k: int) -> float:
    """AP@k: precision summed at the relevant ranks within the top k, divided by min(n_relevant, k)
    (so a perfect top k scores 1 even when more than k items are relevant)."""
    rel = _rel(rel)[:k]
    if n_relevant <= 0:
        raise ValueError("average precision needs at least one relevant item")
    hits = np.flatnonzero(rel)
    return float(np.sum(np.arange(1, len(hits) + 1) / (hits + 1)) / min(n_relevant, k))


def precision_at_k(rel, k: int) -> float:
    """Relevant results among the first k, over k (results missing past the end count as wrong)."""
    return float(_rel(rel)[:k].sum() / k)


def recall_at_k(rel, n_relevant: int, k: int) -> float:
    return float(_rel(rel)[:k].sum() / n_relevant)


def nmrr(rel, n_relevant: int, gtm: int) -> float:
    """MPEG-7 normalised modified retrieval rank of one query (0 = perfect, 1 = nothing found).

    K = min(4·NG, 2·GTM); a ground-truth item ranked beyond K (or not returned) counts as 1.25·K.
    gtm is the largest NG over all queries of the evaluation."""
    ng = n_relevant
    big_k = min(4 * ng, 2 * gtm)
    ranks = np.flatnonzero(_rel(rel)) + 1.0
    ranks = ranks[ranks <= big_k]
    total = ranks.sum() + (ng - len(ranks)) * 1.25 * big_k
    mrr = total / ng - 0.5 - ng / 2
    return float(mrr / (1.25 * big_k - 0.5 - ng / 2))


def anmrr(rels: list, n_relevants: list[int]) -> float:
    gtm = max(n_relevants)
    return float(np.mean([nmrr(r, n, gtm) for r, n in zip(rels, n_relevants)]))


def micro_ap(scores, correct, n_positives: int) -> float:
    """μAP for copy detection: every (query, result) prediction of every query pooled and sorted by
    score; AP of that single list against n_positives (the queries that have a copy in the database).

    Distractor queries (no copy in the database) only add false positives, so a system must also
    score them lower than true copies to do well."""
    scores, correct = np.asarray(scores, dtype=np.float64), _rel(correct)
    if n_positives <= 0:
        raise ValueError("micro-AP needs at least one query with a copy in the database")
    order = np.argsort(-scores, kind="stable")
    correct = correct[order]
    tp = np.cumsum(correct)
    precision = tp / np.arange(1, len(correct) + 1)
    return float(np.sum(precision[correct]) / n_positives)


def revisited_ap(ranked_ids, positives, junk) -> float:
    """AP as the revisited Oxford/Paris protocol computes it (Radenović et al. 2018): junk items are
    removed from the ranking, and precision is interpolated trapezoidally between ranks."""
    ranked_ids = np.asarray(ranked_ids)
    positives, junk = np.asarray(list(positives)), np.asarray(list(junk))
    if not len(positives):
        return float("nan")
    kept = ranked_ids[~np.isin(ranked_ids, junk)]
    ranks = np.flatnonzero(np.isin(kept, positives))  # 0-based ranks after junk removal
    ap = 0.0
    for j, rank in enumerate(ranks):
        p0 = 1.0 if rank == 0 else j / rank
        p1 = (j + 1) / (rank + 1)
        ap += (p0 + p1) / (2 * len(positives))
    return ap


def revisited_map(rankings, gnd: list[dict]) -> dict[str, float]:
    """mAP under the Easy, Medium and Hard setups of ROxford/RParis.

    gnd[q] has lists "easy", "hard" and "junk" of database ids. Easy: positives easy, hard ignored;
    Medium: positives easy + hard; Hard: positives hard, easy ignored. Queries without positives
    in a setup are left out of that setup's mean."""
    setups = {"easy": (("easy",), ("junk", "hard")),
              "medium": (("easy", "hard"), ("junk",)),
              "hard": (("hard",), ("junk", "easy"))}
    out = {}
    for name, (pos_keys, junk_keys) in setups.items():
        aps = [revisited_ap(r, [i for key in pos_keys for i in g.get(key, [])],
                            [i for key in junk_keys for i in g.get(key, [])]) for r, g in zip(rankings, gnd)]
        aps = [a for a in aps if not np.isnan(a)]
        out[name] = float(np.mean(aps)) if aps else float("nan")
    return out


def interpolated_pr(rel, n_relevant: int, levels: np.ndarray) -> np.ndarray:
    """Interpolated precision (max precision at recall >= r) at each recall level."""
    rel = _rel(rel)
    tp = np.cumsum(rel)
    precision = tp / np.arange(1, len(rel) + 1)
    recall = tp / n_relevant
    best = np.maximum.accumulate(precision[::-1])[::-1] if len(rel) else precision
    first = np.searchsorted(recall, np.asarray(levels) - 1e-12, side="left")  # recall only grows down the list
    return np.where(first < len(rel), best[np.minimum(first, max(len(rel) - 1, 0))] if len(rel) else 0.0, 0.0)
