"""Tiny real-architecture model configs shared by the tests (random weights keep them fast).

The student is MobileNetV3-Small 0.5; the teacher keeps the real hybrid layout (CNN branch +
feature transformer) on that small CNN. Both configs are frozen dataclasses: derive variants
with ``dataclasses.replace``.
"""

from __future__ import annotations

from kdcore.config import ModelConfig

TINY_STUDENT = ModelConfig(kind="student", cnn_name="mobilenetv3_small_050")
TINY_TEACHER = ModelConfig(
    kind="teacher",
    cnn_name="mobilenetv3_small_050",
    global_branch="feature_transformer",
    transformer_dim=32,
    transformer_depth=1,
    transformer_heads=2,
    head_hidden=32,
)
TINY_ENSEMBLE = ModelConfig(
    kind="ensemble",
    cnn_name="mobilenetv3_small_050",
    ensemble_members=("mobilenetv3_small_075",),
    frozen_blocks=-1,
)
