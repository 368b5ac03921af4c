"""Train anywhere: ``--device auto`` resolves to this machine's CPU, mixed-precision flags are
refused where they cannot work, and ``torchrun --nproc_per_node 2`` (gloo) trains the same
weights as one process with the same global batch, and resumes from its saved epoch."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdcore.checkpoint import CheckpointMeta
from kdcore.config import REPO_ROOT
from kdcore.runtime import Runtime, RuntimeConfig, describe, resolve_amp, resolve_device, resolve_runtime

TRAIN_PY = REPO_ROOT / "train.py"
# Tiny and deterministic: 18 training images, 2 steps of a global batch of 8 per epoch; no
# dropout, BatchNorm frozen (per-rank batch statistics would differ from the whole batch's)
# and no class weighting (a weighted mean per rank is not the weighted mean of the batch).
RECIPE = [
    "--subset", "18", "--epochs", "1",
    "--set", "batch_size=8", "views_per_image=2", "mixup_views=0", "model.dropout=0.0",
    "freeze_batchnorm=true", "class_weighting=false", "warmup_epochs=0",
]  # fmt: skip
# Float sums in another order (all-reduce), nothing else; Adam's normalised steps magnify them
# where a gradient is near zero (seen here: up to 1.3e-5 after two steps of lr 2e-3).
WEIGHT_TOLERANCE = 5e-5


def torchrun(processes: int, out: Path, *extra: str, busi: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        str(TRAIN_PY), "scratch", "--data", str(busi), "--device", "auto", *RECIPE, "--out", str(out), *extra,
    ]  # fmt: skip
    return subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)


def test_auto_device_is_this_machines_cpu():
    assert resolve_device("auto") == torch.device("cpu" if not torch.cuda.is_available() else "cuda")
    runtime = resolve_runtime(RuntimeConfig(), env={})
    assert (runtime.world_size, runtime.rank, runtime.amp_dtype, runtime.is_main) == (1, 0, None, True)
    assert runtime.record()["device"] == "cpu" and runtime.pin_memory is False  # pinning is for CUDA


def test_threads_option_sets_this_processs_cpu_threads():
    """Beside another job on 2 cores, a student epoch took 33 s with PyTorch's 2 threads per
    job and 7 s with one: the option must reach torch and the run's log line."""
    before = torch.get_num_threads()
    try:
        runtime = resolve_runtime(RuntimeConfig(threads=1), env={})
        assert torch.get_num_threads() == 1 and "CPU threads 1," in describe(runtime, 32, 1e-3)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(RuntimeError, match="--threads must be >= 1"):
        resolve_runtime(RuntimeConfig(threads=-1), env={})
    train = importlib.import_module("train")
    assert train.runtime_config(train.build_parser().parse_args(["cv", "--name", "x", "--threads", "1"])).threads == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_only_switches_are_refused_with_a_clear_message():
    for mode in ("auto", "bf16", "fp16"):
        with pytest.raises(RuntimeError, match=f"--amp {mode} needs a CUDA device, but this run is on cpu"):
            resolve_amp(mode, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="--device cuda: no usable CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="must divide by the 2 processes"):
        Runtime(torch.device("cpu"), world_size=2).per_rank_batch(7)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_train_py_refuses_amp_on_cpu_before_doing_any_work(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(TRAIN_PY), "scratch", "--amp", "bf16", "--out", str(tmp_path / "s")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "error: --amp bf16 needs a CUDA device" in result.stderr
    assert not list(tmp_path.iterdir())


def test_two_gloo_processes_train_the_weights_of_one_process_and_resume(busi_dir, tmp_path):
    one, two = tmp_path / "one" / "student", tmp_path / "two" / "student"
    for out in (one, two):
        out.parent.mkdir()
    single = torchrun(1, one, busi=busi_dir)
    assert single.returncode == 0, single.stderr[-3000:]
    double = torchrun(2, two, busi=busi_dir)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "global batch 8 = 2 x 4 per process" in double.stdout and double.stdout.count("saved ") == 1

    a, b = load_file(str(one.with_suffix(".safetensors"))), load_file(str(two.with_suffix(".safetensors")))
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < WEIGHT_TOLERANCE, worst
    record, reference = CheckpointMeta.read(two), CheckpointMeta.read(one)
    assert record.runtime["world_size"] == 2 and record.runtime["backend"] == "gloo"
    assert reference.runtime["world_size"] == 1
    # the training loss is reduced over both ranks: the whole batch's, as in one process
    assert abs(record.history[0]["train_loss"] - reference.history[0]["train_loss"]) < 1e-5
    assert record.history[0]["train_loss"] > 0

    resumed = torchrun(2, two, "--epochs", "2", "--resume", busi=busi_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed after epoch 1" in resumed.stdout
    history = CheckpointMeta.read(two).history
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[0] == record.history[0]  # epoch 1 was not trained again


def test_cross_validation_with_kd_caches_runs_unchanged_under_torchrun(busi_dir, tmp_path):
    """A teacher CV fold, then a KD student fold learning from it, both on 2 gloo processes:
    rank 0 builds the view bank and the teacher outputs once, writes the results once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    common = [
        "--data", str(busi_dir), "--subset", "24", "--epochs", "1", "--k", "2", "--folds", "0",
        "--runs", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports"),
    ]  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TRAIN_PY)]
    for role in (["--name", "t", "--role", "teacher"], ["--name", "s", "--role", "student", "--teacher-cv", "t"]):
        extra = ["--set", "views_per_image=2", "mixup_views=2", "attention_weight=1"] if "student" in role else []
        result = subprocess.run(
            [*launcher, "cv", *role, *common, *extra],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("fold 0: accuracy") == 1  # rank 0 reports, once
    work = tmp_path / "runs" / "t" / "work"
    assert len(list(work.glob("view_bank_*.pt"))) == 1 and len(list(work.glob("teacher_outputs_*.pt"))) == 1
    student = CheckpointMeta.read(tmp_path / "runs" / "s" / "fold0")
    assert student.runtime["world_size"] == 2 and student.history[0]["train_kd"] > 0
    assert student.history[0]["train_at"] > 0
    for name in ("t", "s"):
        assert len(json.loads((tmp_path / "reports" / "cv" / f"{name}.json").read_text())["folds"]) == 1
