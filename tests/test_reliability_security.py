"""Safe loading (no pickle code runs, sha256 verified) and safe defaults of the served app
(loopback only, no share link, bounded uploads, uploads deleted, no details in errors)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gradio as gr
import pytest
import torch
from app_helpers import free_port, launch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from hostile_inputs import VALID_IMAGE, speckle
from PIL import Image
from test_checkpoint import _Payload
from test_cli import make_fake_busi, run_main

import kdcore.app.handlers
from kdcore.app.layout import CACHE_CLEANUP_SECONDS, MAX_UPLOAD
from kdcore.app.patches.upload_cache import use_private_upload_cache
from kdcore.app.service import load_models
from kdcore.checkpoint import CheckpointError
from kdcore.config import REPO_ROOT
from kdcore.data import sha256_file
from kdcore.engine import ViewBank
from kdcore.experiment.teacher_outputs import teacher_view_outputs
from kdcore.inference import load_predictor


def copy_checkpoint(source: Path, folder: Path, role: str) -> Path:
    """``role.safetensors`` + ``role.json`` in ``folder``, copied from ``source``; returns the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (".safetensors", ".json"):
        shutil.copy(source.with_suffix(suffix), folder / f"{role}{suffix}")
    return folder / f"{role}.safetensors"


def disguise_pickle_as_weights(weights: Path, marker: Path) -> None:
    """Replace the weights by a pickle whose loading would create ``marker``, and re-sign the
    JSON so that the sha256 check passes: only the loader itself can refuse it."""
    torch.save({"conv_stem.weight": torch.zeros(1), "payload": _Payload(str(marker))}, weights)
    config_path = weights.with_suffix(".json")
    config = json.loads(config_path.read_text())
    config["weights_sha256"] = sha256_file(weights)
    config_path.write_text(json.dumps(config))


def tamper(weights: Path) -> None:
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- safe loading


def test_pickle_checkpoint_is_refused_by_the_app_and_the_cli(tmp_path, tiny_checkpoints, capsys):
    marker = tmp_path / "code_ran"
    folder = tmp_path / "checkpoints"
    weights = copy_checkpoint(tiny_checkpoints["student"], folder, "student")
    disguise_pickle_as_weights(weights, marker)

    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_predictor(weights)
    models = load_models(folder)
    assert "student" not in models.cams and models.student_cam is None
    assert any(p.startswith("student: checkpoint is broken") for p in models.problems)
    assert str(tmp_path) not in models.status_markdown
    (tmp_path / "scans" / "benign").mkdir(parents=True)
    shutil.copy(VALID_IMAGE, tmp_path / "scans" / "benign" / "x.png")
    code, _, err = run_main(
        capsys, "evaluate", "--checkpoint", weights, "--data", tmp_path / "scans", "--out", tmp_path / "o.json"
    )
    assert code == 2 and "cannot be loaded" in err
    assert not marker.exists()


@pytest.mark.parametrize("command", ["teacher", "scratch"])
def test_pickle_init_weights_are_refused_by_training(tmp_path, command, capsys):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "backbone.pth"
    torch.save({"conv_stem.weight": torch.zeros(1), "payload": _Payload(str(marker))}, evil)
    data = tmp_path / "busi"
    split_file = make_fake_busi(data)
    code, _, err = run_main(
        capsys, command, "--data", data, "--split-file", split_file, "--init-weights", evil, "--out", tmp_path / "m"
    )
    assert code == 2 and "backbone.pth: not a plain tensor file, refused" in err
    assert not marker.exists() and not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("damage", ["pickle", "truncated"])
def test_poisoned_teacher_logit_cache_is_recomputed_not_run(tmp_path, tiny_checkpoints, damage, capsys):
    marker = tmp_path / "code_ran"
    side = json.loads(tiny_checkpoints["teacher"].with_suffix(".json").read_text())["preprocess"]["input_size"]
    views = ViewBank(torch.zeros(1, 1, 1, side, side, dtype=torch.uint8), torch.zeros(1, 1, 3))
    genuine, *_ = teacher_view_outputs(tiny_checkpoints["teacher"], views, tmp_path, 7)  # writes the cache file
    (cache_file,) = tmp_path.glob("teacher_outputs_*.pt")
    good_bytes = cache_file.read_bytes()
    bad_bytes = pickle.dumps(_Payload(str(marker))) if damage == "pickle" else good_bytes[: len(good_bytes) // 2]
    cache_file.write_bytes(bad_bytes)

    recomputed, *_ = teacher_view_outputs(tiny_checkpoints["teacher"], views, tmp_path, 7)

    assert not marker.exists()
    assert torch.equal(recomputed, genuine)
    assert torch.equal(torch.load(cache_file, weights_only=True)["logits"], genuine)  # the cache was rewritten
    out = capsys.readouterr().out
    assert f"ignoring teacher-output cache {cache_file}" in out and "not a plain tensor file, refused" in out


def test_corrupt_resume_state_stops_training_with_one_line(tmp_path, capsys):
    data = tmp_path / "busi"
    split_file = make_fake_busi(data)
    out = tmp_path / "runs" / "scratch"
    state = out.parent / "work" / out.name / "last.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"PK\x03\x04 not really a zip")
    args = ["scratch", "--data", data, "--split-file", split_file, "--out", out, "--epochs", "1", "--resume"]
    code, _, err = run_main(capsys, *args)
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"error: cannot resume from {state}: last.pt: not a plain tensor file, refused (RuntimeError); "
        "delete it or run without --resume"
    )


# ----------------------------------------------------------------------------- served app


@pytest.fixture(scope="module")
def tampered_app(tiny_checkpoints, tmp_path_factory):
    """Good teacher, tampered student: the app must say so and keep serving the teacher."""
    folder = tmp_path_factory.mktemp("tampered")
    copy_checkpoint(tiny_checkpoints["teacher"], folder, "teacher")
    tamper(copy_checkpoint(tiny_checkpoints["student"], folder, "student"))
    demo = launch(folder)
    yield demo, folder
    demo.close()


def test_tampered_checkpoint_is_named_and_the_rest_keeps_serving(tampered_app):
    demo, folder = tampered_app
    texts = [c.get("props", {}).get("value") for c in demo.get_config_file()["components"]]
    status = next(t for t in texts if isinstance(t, str) and "not available" in t)
    assert "student" in status and "sha256 does not match" in status and str(folder) not in status
    payload, teacher_overlay, student_overlay = Client(demo.local_url, verbose=False).predict(
        handle_file(VALID_IMAGE), api_name="/predict"
    )
    assert set(payload) == {"teacher"} and teacher_overlay and student_overlay is None


def test_app_listens_on_loopback_only_without_share_link(tampered_app):
    demo, _ = tampered_app
    assert demo.server_name == "127.0.0.1" and demo.share is False and demo.share_url is None
    assert demo.max_file_size == gr.FileSize.MB * int(MAX_UPLOAD.removesuffix("mb"))
    assert demo.show_error is False and demo.delete_cache == CACHE_CLEANUP_SECONDS
    address = _non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback interface to probe")
    with pytest.raises(OSError), socket.create_connection((address, demo.server_port), timeout=2):
        pass


def _non_loopback_address() -> str | None:
    """This machine's own address on its default interface (a UDP 'connect' sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1, never routed
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_unexpected_errors_reach_the_client_without_details(tampered_app, monkeypatch):
    demo, _ = tampered_app

    def crash(*_):
        raise RuntimeError('Traceback: File "/srv/secret/kdcore/service.py", line 1')

    monkeypatch.setattr(kdcore.app.handlers, "analyse_image", crash)
    client = Client(demo.local_url, verbose=False)
    with pytest.raises(AppError) as error:
        client.predict(handle_file(VALID_IMAGE), api_name="/predict")
    assert "/srv/secret" not in str(error.value) and "Traceback" not in str(error.value)
    monkeypatch.undo()
    payload, *_ = client.predict(handle_file(VALID_IMAGE), api_name="/predict")
    assert set(payload) == {"teacher"}


def test_uploads_and_overlays_are_deleted_when_the_app_stops(tiny_checkpoints, tmp_path):
    copy_checkpoint(tiny_checkpoints["teacher"], tmp_path, "teacher")  # teacher only: quick to start
    scan = tmp_path / "scan.png"  # not an example image: Gradio keeps those (same content, same cache file)
    Image.fromarray(speckle()).save(scan)
    demo = launch(tmp_path)
    try:
        Client(demo.local_url, verbose=False).predict(handle_file(scan), api_name="/predict")
        examples = {f for block in demo.blocks.values() for f in getattr(block, "keep_in_cache", ())}
        cached = [Path(f) for files in demo.temp_file_sets for f in files if f not in examples]
        assert any(p.name == "scan.png" and p.is_file() for p in cached)
        private = Path(os.environ["GRADIO_TEMP_DIR"])
        assert all(p.is_relative_to(private) for p in cached)
    finally:
        demo.close()
    assert [p for p in cached if p.exists()] == []


def test_each_app_process_gets_a_private_upload_folder(monkeypatch):
    monkeypatch.delenv("GRADIO_TEMP_DIR")
    folder = use_private_upload_cache()
    try:
        assert os.environ["GRADIO_TEMP_DIR"] == str(folder) and folder.is_dir()
        assert folder.stat().st_mode & 0o777 == 0o700  # other users cannot read the patients' images
        assert use_private_upload_cache() == folder  # a folder already chosen (by us or the user) is kept
    finally:
        folder.rmdir()


def test_app_stopped_by_sigterm_deletes_its_upload_folder(tmp_path, tiny_checkpoints):
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("GRADIO_TEMP_DIR")
    port = free_port()
    args = [sys.executable, "app.py", "--port", str(port), "--checkpoints", str(tiny_checkpoints["student"].parent)]
    app = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = Client(wait_for_app(f"http://127.0.0.1:{port}/", app), verbose=False)
        client.predict(handle_file(VALID_IMAGE), api_name="/predict")
        client.close()
        (folder,) = tmp_path.glob("kd-demo-uploads-*")
        assert any(path.name == VALID_IMAGE.name for path in folder.rglob("*"))
        app.send_signal(signal.SIGTERM)
        assert app.wait(timeout=60) in (0, 1)
    finally:
        app.kill()
    assert not folder.exists()


def wait_for_app(url: str, app: subprocess.Popen, timeout_s: float = 180.0) -> str:
    """``url`` once the app answers there; fails if the process ends first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert app.poll() is None, f"app exited with code {app.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return url
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"app did not answer at {url} within {timeout_s:.0f} s")
