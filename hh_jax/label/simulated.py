"""A simulated labeler for iterated online RLHF (PAPER.md §4.5; Gao et al. 2022's setup):
a gold PM's scores stand in for a person's judgement.

P(a ≻ b) = σ((r_a − r_b) / T) (Bradley–Terry at temperature T; T = 0: the higher gold
score always wins, a tie is a coin flip), then the label is flipped with probability
`noise`. Each pair's two uniform draws come from an RNG keyed by (seed, the pair's id), so
a pair gets the same label whatever order or batch it is labeled in: a resumed round
relabels nothing differently.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np


def _pair_rng(seed: int, pair_id: str) -> np.random.Generator:
    digest = hashlib.sha256(pair_id.encode("utf-8", "surrogatepass")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


@dataclasses.dataclass(frozen=True)
class SimulatedLabeler:
    temperature: float = 1.0  # T of σ((r_a − r_b)/T); 0: deterministic
    noise: float = 0.0  # probability that a label is flipped after the BT draw
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"labeler temperature must be ≥ 0, got {self.temperature}")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"labeler noise must be in [0, 1], got {self.noise}")

    @property
    def name(self) -> str:
        """The store's `labeler` field: what produced a label, with its settings."""
        return f"simulated:T={self.temperature:g},noise={self.noise:g},seed={self.seed}"

    def prob_a(self, r_a_P: np.ndarray, r_b_P: np.ndarray) -> np.ndarray:
        """P(a ≻ b) before noise: σ((r_a − r_b)/T), or 1 / 0 / ½ at T = 0."""
        diff_P = np.asarray(r_a_P, np.float64) - np.asarray(r_b_P, np.float64)
        if self.temperature == 0:
            return np.where(diff_P > 0, 1.0, np.where(diff_P < 0, 0.0, 0.5))
        return 0.5 * (1.0 + np.tanh(diff_P / (2.0 * self.temperature)))  # σ, overflow-free

    def label(self, ids: Sequence[str], r_a_P: np.ndarray, r_b_P: np.ndarray) -> dict:
        """{"choice": ["a"|"b", ...], "p_a_P": P(a ≻ b) before noise, "flipped_P": which
        labels the noise flipped} for pairs with gold scores r_a_P, r_b_P."""
        p_a_P = self.prob_a(r_a_P, r_b_P)
        if len(ids) != len(p_a_P):
            raise ValueError(f"{len(ids)} ids but {len(p_a_P)} score pairs")
        u_Px2 = np.asarray([_pair_rng(self.seed, i).random(2) for i in ids]).reshape(-1, 2)
        prefer_a_P = u_Px2[:, 0] < p_a_P
        flipped_P = u_Px2[:, 1] < self.noise
        choice_a_P = prefer_a_P ^ flipped_P
        return {"choice": ["a" if c else "b" for c in choice_a_P], "p_a_P": p_a_P,
                "flipped_P": flipped_P}
