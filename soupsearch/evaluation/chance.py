"""Checks of a search's inputs that catch silent nonsense before hours are spent on it."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def chance_level(labels: np.ndarray) -> float:
    """The accuracy of always predicting the most frequent class of ``labels``."""
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        return 0.0
    return float(np.bincount(labels.astype(np.int64) - labels.min()).max() / labels.size)


def near_chance_warning(val_accuracy: Sequence[float], labels: np.ndarray, names: Sequence[str]) -> str | None:
    """A warning when every ingredient's val accuracy is near chance (within 0.05 of the
    most-frequent-class rate, or below twice it): most often the evaluation's class indices
    do not match the training's (e.g. an ImageFolder's alphabetically sorted folder names)."""
    if not len(val_accuracy):
        return None
    chance = chance_level(labels)
    limit = max(chance + 0.05, 2 * chance)
    best = int(np.argmax(val_accuracy))
    if float(val_accuracy[best]) > limit:
        return None
    return (f"every ingredient scores near chance on val (best: {names[best]} {float(val_accuracy[best]):.4f}; "
            f"always predicting the most frequent class gives {chance:.4f}). Does the evaluation's class order "
            "match the training's? An ImageFolder's classes are its folder names sorted alphabetically; set "
            "data.<split>.class_map (folder name -> class index) to the mapping the models were trained with")
