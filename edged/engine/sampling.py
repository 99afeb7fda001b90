"""Next-token selection: pure functions over a logits vector, no model and no state.

Order of operations follows transformers' `generate` (and llama.cpp's default chain):
repetition penalty, temperature, top-k, top-p, then a draw. Temperature 0 means greedy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    """0 selects the most likely token (greedy); higher is more random."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p; 1.0 disables."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty (Keskar et al. 2019) on tokens already in the context; 1.0 disables."""

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature = {self.temperature} must be a finite number >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p = {self.top_p} is outside (0, 1]")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty = {self.repetition_penalty} must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(
    logits: np.ndarray, context_ids: Iterable[int], penalty: float
) -> np.ndarray:
    """Divide positive and multiply negative logits of seen tokens by `penalty` (new array)."""
    if penalty == 1.0:
        return logits
    ids = np.fromiter(set(context_ids), dtype=np.int64)
    if ids.size == 0:
        return logits
    out = logits.copy()
    seen = out[ids]
    out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


def select_token(
    logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    context_ids: Iterable[int] = (),
) -> int:
    """The next token id from a 1-D logits vector."""
    logits = apply_repetition_penalty(logits, context_ids, params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < scaled.size:
        candidates = np.argpartition(scaled, -params.top_k)[-params.top_k :]
    else:
        candidates = np.arange(scaled.size)
    cand_logits = scaled[candidates]
    order = np.argsort(-cand_logits, kind="stable")
    candidates, cand_logits = candidates[order], cand_logits[order]
    probs = np.exp(cand_logits - cand_logits[0])
    probs /= probs.sum()
    if params.top_p < 1.0:
        # Keep tokens while the mass *before* them is below top_p, so the first always stays.
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
    return int(candidates[rng.choice(probs.size, p=probs)])
