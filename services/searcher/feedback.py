"""Rocchio relevance feedback: move the query towards hits marked relevant, away from the others."""

from __future__ import annotations

import numpy as np

from services.common.errors import InvalidInput

MAX_FEEDBACK = 100  # ids per request: each is a stored-vector lookup on every shard


def parse_marks(marks: list[str]) -> tuple[list[int], list[int]]:
    """'+12 -7' / '+12,-7' tokens -> (relevant ids, not relevant ids)."""
    relevant, not_relevant = [], []
    for token in (t for m in marks for t in m.replace(",", " ").split()):
        sign, digits = token[0], token[1:]
        if sign not in "+-" or not digits.isdigit():
            raise InvalidInput(f"feedback {token!r}: write +ID for relevant, -ID for not relevant")
        (relevant if sign == "+" else not_relevant).append(int(digits))
    check_counts(relevant, not_relevant)
    return relevant, not_relevant


def check_counts(relevant: list[int], not_relevant: list[int]) -> None:
    if len(relevant) + len(not_relevant) > MAX_FEEDBACK:
        raise InvalidInput(f"at most {MAX_FEEDBACK} feedback ids, got {len(relevant) + len(not_relevant)}")
    if set(relevant) & set(not_relevant):
        raise InvalidInput(f"ids marked both relevant and not relevant: {sorted(set(relevant) & set(not_relevant))}")


def rocchio(query: np.ndarray, relevant: np.ndarray, not_relevant: np.ndarray, alpha: float = 1.0,
            beta: float = 0.75, gamma: float = 0.15) -> np.ndarray:
    """q' = α·q + β·mean(relevant) − γ·mean(not relevant), L2-normalised (the index scores by inner
    product of unit vectors). Empty groups contribute nothing."""
    q = alpha * np.asarray(query, dtype=np.float64)
    if len(relevant):
        q = q + beta * np.mean(relevant, axis=0)
    if len(not_relevant):
        q = q - gamma * np.mean(not_relevant, axis=0)
    norm = np.linalg.norm(q)
    if not np.isfinite(norm) or norm < 1e-12:
        raise InvalidInput("relevance feedback cancelled the query out: mark fewer hits not relevant")
    return (q / norm).astype(np.float32)


def requery(query: np.ndarray, marked: np.ndarray, n_relevant: int, settings) -> np.ndarray:
    """The Rocchio query (1 x d) from the stored vectors of the marked hits, relevant ones first,
    with the weights of the settings (IMSEARCH_FEEDBACK_ALPHA/BETA/GAMMA)."""
    return rocchio(query, marked[:n_relevant], marked[n_relevant:], settings.feedback_alpha,
                   settings.feedback_beta, settings.feedback_gamma)[None, :]
