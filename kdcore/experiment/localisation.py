"""Where a model looks: the Grad-CAM pointing game on lesion images (test split or a CV fold)."""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm

from kdcore.cam import grad_cam
from kdcore.data import lesion_mask
from kdcore.experiment.protocol import BusiData
from kdcore.inference import Predictor
from kdcore.overlay import cam_peak


def pointing_game(predictor: Predictor, data: BusiData, split: str = "test") -> dict[str, Any]:
    """Share of ``split``'s lesion images whose Grad-CAM peak lies inside a lesion mask, and the
    chance rate (mean mask area); ``None`` scores when the split has no masked lesion image."""
    hits, areas = [], []
    for record, grey in tqdm(
        zip(data.records[split], data.greys[split]), desc=f"pointing game {predictor.name}", leave=False
    ):
        mask = None if record.label == "normal" else lesion_mask(data.root, record)
        if mask is None:
            continue
        _, heatmap = grad_cam(predictor, grey)
        row, col = cam_peak(heatmap, *mask.shape)
        hits.append(bool(mask[row, col]))
        areas.append(float(mask.mean()))
    if not hits:
        return {"n": 0, "pointing_game": None, "chance_rate": None}
    return {"n": len(hits), "pointing_game": float(np.mean(hits)), "chance_rate": float(np.mean(areas))}
