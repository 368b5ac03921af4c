"""The operating point: the malignant-probability threshold a model's verdict uses, chosen on
validation (never test) for a target sensitivity, with the specificity it buys.

Rule: the verdict is ``malignant`` when the calibrated malignant probability reaches the
threshold, otherwise the more probable of the other classes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

POSITIVE_CLASS = "malignant"
TARGET_SENSITIVITY = 0.90


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold on p(malignant) and what it measured on the data it was chosen on."""

    threshold: float
    target_sensitivity: float
    sensitivity: float
    specificity: float
    positives: int
    negatives: int
    source: str  # what it was chosen on, e.g. "validation split"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> OperatingPoint:
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__})

    def describe(self) -> str:
        """One line for people: the rule and its sensitivity / specificity."""
        return (
            f"{POSITIVE_CLASS} when p({POSITIVE_CLASS}) ≥ {self.threshold:.0%}: sensitivity "
            f"{self.sensitivity:.0%}, specificity {self.specificity:.0%} on the {self.source} "
            f"({self.positives} {POSITIVE_CLASS}, {self.negatives} other)"
        )


ARGMAX_RULE = "the most probable class (this checkpoint has no operating point)"


@functools.lru_cache(maxsize=16)
def verdict_rule(point: OperatingPoint | None) -> str:
    """How a model's verdict is made, in words (cached: the live tab asks on every frame)."""
    return point.describe() if point else ARGMAX_RULE


def sensitivity_specificity(p_positive: np.ndarray, is_positive: np.ndarray, threshold: float) -> tuple[float, float]:
    """Share of positives at or above ``threshold`` and of negatives below it."""
    called = np.asarray(p_positive) >= threshold
    is_positive = np.asarray(is_positive, dtype=bool)
    sensitivity = float(called[is_positive].mean()) if is_positive.any() else float("nan")
    specificity = float((~called[~is_positive]).mean()) if (~is_positive).any() else float("nan")
    return sensitivity, specificity


def choose_operating_point(
    p_positive: np.ndarray, is_positive: np.ndarray, source: str, target: float = TARGET_SENSITIVITY
) -> OperatingPoint:
    """The highest threshold whose sensitivity on these cases reaches ``target``."""
    p_positive = np.asarray(p_positive, dtype=np.float64)
    is_positive = np.asarray(is_positive, dtype=bool)
    if not is_positive.any():
        raise ValueError(f"cannot choose an operating point without {POSITIVE_CLASS} cases")
    ranked = np.sort(p_positive[is_positive])[::-1]
    needed = math.ceil(round(target * len(ranked), 9))
    threshold = float(ranked[max(needed, 1) - 1])
    sensitivity, specificity = sensitivity_specificity(p_positive, is_positive, threshold)
    return OperatingPoint(
        threshold=threshold,
        target_sensitivity=target,
        sensitivity=sensitivity,
        specificity=specificity,
        positives=int(is_positive.sum()),
        negatives=int((~is_positive).sum()),
        source=source,
    )


def decide(probabilities: np.ndarray, class_names: Sequence[str], point: OperatingPoint | None) -> np.ndarray:
    """Verdict indices for (N, C) or (C,) probabilities: the threshold rule, or argmax without a point."""
    probs = np.asarray(probabilities, dtype=np.float64)
    if point is None or POSITIVE_CLASS not in class_names:
        return probs.argmax(-1)
    positive = list(class_names).index(POSITIVE_CLASS)
    others = probs.copy()
    others[..., positive] = -np.inf
    return np.where(probs[..., positive] >= point.threshold, positive, others.argmax(-1))
