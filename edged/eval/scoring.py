"""Pure numpy over next-token logits: log-likelihoods, agreement and divergence."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax, stable for large logits."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_logprobs(logits: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    """The log-probability of each of `tokens` under the row of `logits` that predicts it."""
    if len(tokens) != len(logits):
        raise ValueError(f"{len(tokens)} tokens but {len(logits)} rows of logits")
    if not len(tokens):
        return np.zeros(0, dtype=np.float64)
    lp = log_softmax(np.asarray(logits, dtype=np.float64))
    return lp[np.arange(len(tokens)), np.asarray(tokens)]


def perplexity(total_nll: float, tokens: int) -> float:
    """exp of the mean negative log-likelihood per token (nats); inf for no tokens."""
    return float(np.exp(total_nll / tokens)) if tokens else float("inf")


def top1_agreement(logits: np.ndarray, reference: np.ndarray) -> int:
    """Positions where both argmaxes agree (reference and model must share a vocabulary)."""
    width = min(logits.shape[-1], reference.shape[-1])
    return int((logits[:, :width].argmax(-1) == reference[:, :width].argmax(-1)).sum())


def kl_divergence(reference: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(reference || model) per position, in nats, over the shared vocabulary."""
    width = min(logits.shape[-1], reference.shape[-1])
    p = log_softmax(np.asarray(reference[:, :width], dtype=np.float64))
    q = log_softmax(np.asarray(logits[:, :width], dtype=np.float64))
    return (np.exp(p) * (p - q)).sum(axis=-1)


def best_option(scores: Sequence[float]) -> int:
    """Index of the highest score (the first on ties)."""
    return int(np.argmax(np.asarray(scores)))
