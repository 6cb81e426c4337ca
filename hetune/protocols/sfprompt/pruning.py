"""EL2N dataset pruning (Paul et al. 2021): keep the hardest gamma fraction of local samples."""

from __future__ import annotations

import math

import numpy as np
import torch


@torch.no_grad()
def el2n_scores(logits_fn, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256, ignore_index: int = -100) -> np.ndarray:
    """||softmax(f(x)) - onehot(y)||_2 per sample; ``logits_fn`` is the local head+tail model.

    Causal-LM samples ((B, L, vocab) logits, (B, L) targets): the mean of the per-token
    scores over the positions that have a target (``ignore_index`` elsewhere).
    """
    scores = []
    for start in range(0, len(y), batch_size):
        logits = logits_fn(x[start : start + batch_size])  # (B, classes) or (B, L, vocab)
        target = y[start : start + batch_size]
        valid = target != ignore_index
        probs = torch.softmax(logits.double(), dim=-1)
        onehot = torch.nn.functional.one_hot(target.clamp(min=0), probs.shape[-1]).double()
        per_position = torch.linalg.vector_norm(probs - onehot, dim=-1) * valid
        if per_position.dim() == 1:
            scores.append(per_position)
        else:
            scores.append(per_position.sum(1) / valid.sum(1).clamp(min=1))
    return torch.cat(scores).numpy() if scores else np.zeros(0)


def keep_count(n: int, gamma: float) -> int:
    return math.floor(gamma * n)


def prune_top(scores: np.ndarray, gamma: float) -> np.ndarray:
    """Indices (ascending) of the floor(gamma * n) highest scores; ties go to the lower index."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    return np.sort(order[: keep_count(len(scores), gamma)])
