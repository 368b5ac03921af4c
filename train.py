"""Train and evaluate the BUSI teacher/student models.

python train.py teacher   train the hybrid ViT+CNN teacher
python train.py student   distil a student from a trained teacher (KD)
python train.py scratch   train the same student without a teacher (the ablation)
python train.py evaluate  score a checkpoint on BUSI's test split or any class folder
python train.py cv        5-fold group-aware cross-validation of a recipe on train+val
python train.py all       the whole reference protocol + reports (resumable)
python train.py split     rebuild the near-duplicate groups and the split file
python train.py report    rebuild reports/ from the runs of `all`
python train.py operating-point  choose a checkpoint's malignant threshold on validation

Every training command runs on one process or under `torchrun --nproc_per_node N train.py ...`
(distributed data parallel: gloo on CPU, NCCL on GPUs); see --device, --amp, --workers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if os.environ.get("RANK", "0") != "0":  # a torchrun rank other than 0: progress bars on rank 0 only
    os.environ.setdefault("TQDM_DISABLE", "1")  # (tqdm reads it when imported, so before kdcore)

from kdcore.config import (
    DEFAULT_DATA_DIR,
    DEFAULT_EXTERNAL_DIR,
    DEFAULT_SPLIT_FILE,
    PRESETS,
    REPO_ROOT,
    Preset,
    Recipe,
    extra_student_recipe,
    get_preset,
    scratch_recipe,
)


def _device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="where to run (auto: CUDA, else Apple MPS, else CPU; default: %(default)s)",
    )


def _runtime_options(p: argparse.ArgumentParser) -> None:
    _device_option(p)
    p.add_argument(
        "--amp",
        default="off",
        choices=["off", "auto", "bf16", "fp16"],
        help="mixed precision on CUDA (auto: bf16 where supported, else fp16 with a gradient scaler)",
    )
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="keep the NCHW memory layout")
    p.add_argument(
        "--pin-memory",
        dest="pin_memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pinned host memory for batches (default: on with CUDA)",
    )
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads of this process (default 0: PyTorch's, one per core); give each of several "
        "jobs sharing the cores its share, e.g. 1 for two jobs on 2 cores",
    )


def runtime_config(args: argparse.Namespace):
    """The command line's ``RuntimeConfig`` (device only for evaluation commands)."""
    from kdcore.runtime import RuntimeConfig

    names = ("device", "amp", "channels_last", "pin_memory", "workers", "threads")
    return RuntimeConfig(**{n: getattr(args, n) for n in names if hasattr(args, n)})


def _common(p: argparse.ArgumentParser) -> None:
    _runtime_options(p)
    p.add_argument(
        "--preset",
        default="offline",
        choices=sorted(PRESETS),
        help="recipe: 'offline' (default, trainable here) or 'paper' (needs internet)",
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="BUSI folder (default: %(default)s)")
    p.add_argument("--split-file", type=Path, default=DEFAULT_SPLIT_FILE, help="committed split (default: %(default)s)")
    p.add_argument(
        "--allow-data-mismatch",
        action="store_true",
        help="train even if files differ from manifest.csv / the split file",
    )
    p.add_argument("--subset", type=int, default=0, help="at most N images per split (smoke runs)")
    p.add_argument("--epochs", type=int, help="override the preset's epochs (same as --set epochs=N)")
    p.add_argument("--seed", type=int, help="override the seed (same as --set seed=N)")
    p.add_argument("--resume", action="store_true", help="continue from the last saved epoch")
    p.add_argument(
        "--set",
        dest="settings",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override recipe values: training keys (lr=3e-4 kd_temperature=2 augment.hflip=false), "
        "model.* (model.cnn_name=tf_efficientnet_lite2) and preprocess.* (preprocess.input_size=260)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("teacher", help="train the hybrid teacher")
    _common(p)
    p.add_argument("--out", type=Path, default=Path("runs/offline/teacher"), help="checkpoint stem to write")
    p.add_argument("--init-weights", help="local weights file for the CNN branch (same as --set model.cnn_init=PATH)")

    for name, text in (
        ("student", "distil a student from a trained teacher"),
        ("scratch", "train the student without a teacher"),
    ):
        p = sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("--out", type=Path, default=Path(f"runs/offline/{name}"), help="checkpoint stem to write")
        p.add_argument("--init-weights", help="local weights file for the backbone (same as --set model.cnn_init=PATH)")
        p.add_argument("--extra", action="store_true", help="use the preset's extra student (EfficientNet-Lite0)")
        if name == "student":
            p.add_argument("--teacher", type=Path, default=Path("runs/offline/teacher"), help="teacher checkpoint")

    p = sub.add_parser("cv", help="k-fold group-aware cross-validation of a recipe on train+val (resumable)")
    _common(p)
    p.add_argument("--name", required=True, help="name of this recipe's CV run (results: REPORTS/cv/NAME.json)")
    p.add_argument("--role", choices=["teacher", "student", "scratch"], default="teacher", help="what to train")
    p.add_argument("--init-weights", help="local weights file for the backbone (same as --set model.cnn_init=PATH)")
    p.add_argument("--extra", action="store_true", help="use the preset's extra student (EfficientNet-Lite0)")
    p.add_argument("--teacher-cv", help="KD students: the teacher CV run whose fold-k teacher fold k learns from")
    p.add_argument("--k", type=int, default=5, help="number of folds (default: %(default)s)")
    p.add_argument("--folds", type=int, nargs="+", help="only these folds (default: all)")
    p.add_argument("--runs", type=Path, default=Path("runs/cv"), help="folder for the fold models")
    p.add_argument("--reports", type=Path, default=REPO_ROOT / "reports", help="results go to REPORTS/cv/")

    p = sub.add_parser(
        "operating-point",
        help="choose a checkpoint's malignant threshold on the validation split (sensitivity >= 0.90) and store it",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="NAME.safetensors (with NAME.json beside it)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--split-file", type=Path, default=DEFAULT_SPLIT_FILE)
    p.add_argument("--allow-data-mismatch", action="store_true", help="use the split even if files differ")
    _device_option(p)

    p = sub.add_parser("evaluate", help="score a checkpoint; writes JSON + Markdown + confusion PNG")
    p.add_argument("--checkpoint", type=Path, required=True, help="NAME.safetensors (with NAME.json beside it)")
    p.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="BUSI folder (test split) or a folder with benign/ malignant/ normal/ sub-folders",
    )
    p.add_argument("--split-file", type=Path, default=DEFAULT_SPLIT_FILE)
    p.add_argument("--out", type=Path, required=True, help="FILE.json to write")
    _device_option(p)

    for name, text in (
        ("all", "teacher -> KD students -> scratch students -> extra rows -> reports"),
        ("report", "rebuild reports/ and re-ship models from the runs of `all`"),
    ):
        p = sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("--runs", type=Path, default=Path("runs"), help="folder for all intermediate runs")
        p.add_argument("--ship-dir", type=Path, default=REPO_ROOT / "checkpoints", help="where shipped models go")
        p.add_argument("--reports", type=Path, default=REPO_ROOT / "reports", help="where tables and figures go")
        p.add_argument("--seeds", type=int, nargs="+", help="student seeds (default: the preset's)")
        p.add_argument("--skip-extra", action="store_true", help="skip the EfficientNet-Lite0 student rows")
        p.add_argument(
            "--external",
            type=Path,
            default=DEFAULT_EXTERNAL_DIR,
            help="class folder of another hospital the shipped models are also scored on, never trained or "
            "tuned on (default: %(default)s; skipped when missing or with --subset)",
        )

    p = sub.add_parser("export", add_help=False, help="ONNX (+INT8) export of a student (train.py export --help)")
    p.add_argument("export_args", nargs=argparse.REMAINDER)

    p = sub.add_parser("split", help="rebuild near-duplicate groups and the split file")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--split-file", type=Path, default=DEFAULT_SPLIT_FILE)
    p.add_argument("--seed", type=int, default=0)
    return parser


def shorthand_settings(args: argparse.Namespace) -> list[str]:
    """``--epochs``, ``--seed`` and ``--init-weights`` as the ``--set`` values they stand for."""
    shorthands = {"epochs": "epochs", "seed": "seed", "init_weights": "model.cnn_init"}
    given = [
        f"{key}={json.dumps(getattr(args, name))}" for name, key in shorthands.items() if getattr(args, name, None)
    ]
    return given + list(args.settings)


def command_recipe(preset: Preset, args: argparse.Namespace) -> Recipe:
    """The preset's teacher, student or extra-student recipe with the command line's settings."""
    if args.command == "teacher" or getattr(args, "role", "") == "teacher":
        recipe = Recipe(preset.teacher, preset.teacher_preprocess, preset.teacher_train)
    elif getattr(args, "extra", False):
        if preset.extra_student is None:
            raise ValueError(f"preset {preset.name!r} has no extra student")
        recipe = Recipe(preset.extra_student, preset.student_preprocess, extra_student_recipe(preset))
    elif args.command == "scratch" or getattr(args, "role", "") == "scratch":
        recipe = Recipe(preset.student, preset.student_preprocess, scratch_recipe(preset))
    else:
        recipe = Recipe(preset.student, preset.student_preprocess, preset.student_train)
    return recipe.with_settings(shorthand_settings(args))


def training_command(args: argparse.Namespace, runtime) -> None:
    """teacher | student | scratch | cv | all | report, on ``runtime`` (one process or a torchrun rank)."""
    from kdcore.experiment import protocol

    preset = get_preset(args.preset)
    if args.command in ("all", "report"):
        from kdcore.experiment import pipeline

        if args.command == "all":
            pipeline.run_all(preset, args, runtime)
        elif runtime.is_main:
            pipeline.write_reports(preset, args)
        return
    data = protocol.load_busi(args.data, args.split_file, args.allow_data_mismatch, args.subset)
    recipe = command_recipe(preset, args)
    if args.command == "cv":
        from kdcore.experiment import cv

        folds = tuple(args.folds) if args.folds else None
        results = args.reports / "cv"
        cv.run_cv(args.name, args.role, recipe, data, args.runs, results, args.k, folds, args.teacher_cv, runtime)
        if runtime.is_main:
            table = cv.cv_table(results, test_size=len(data.records["test"]))
            (results / "README.md").write_text(cv.CV_README + table)
            print(table)
        return
    if args.command == "teacher":
        path = protocol.train_teacher(
            recipe.model, recipe.preprocess, recipe.train, data, args.out, args.resume, runtime
        )
    else:
        teacher = args.teacher if args.command == "student" else None
        path = protocol.train_student(
            recipe.model, recipe.preprocess, recipe.train, data, args.out, teacher, args.resume, runtime=runtime
        )
    if runtime.is_main:
        print(f"saved {path}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:  # its own parser (and --help) live in kdcore.export
        from kdcore import export

        return export.main(argv[1:])
    args = build_parser().parse_args(argv)
    from kdcore.data import DataIntegrityError
    from kdcore.experiment import protocol
    from kdcore.runtime import resolve_device, runtime_for

    try:
        if args.command == "evaluate":
            device = resolve_device(args.device)
            result = protocol.evaluate_checkpoint(args.checkpoint, args.data, args.split_file, args.out, device)
            print(json.dumps({k: result[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1")}, indent=2))
            return 0
        if args.command == "split":
            from kdcore.data import build_split_records, write_split_file

            write_split_file(build_split_records(args.data, seed=args.seed), args.split_file)
            print(f"wrote {args.split_file}")
            return 0
        if args.command == "operating-point":
            data = protocol.load_busi(args.data, args.split_file, args.allow_data_mismatch)
            point = protocol.set_operating_point(args.checkpoint, data, resolve_device(args.device))
            print(point.describe())
            return 0
        with runtime_for(runtime_config(args)) as runtime:
            training_command(args, runtime)
        return 0
    except (DataIntegrityError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from kdcore.malloc_tuning import keep_freed_memory

    keep_freed_memory()  # before torch allocates: big activations reuse freed memory (2x faster here)
    sys.exit(main())
