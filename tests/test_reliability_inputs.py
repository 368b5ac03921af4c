"""Hostile files through every layer that reads them: the app's event handlers, gradio_client
on a live app, and train.py. Each is refused with a message naming the problem (no server
path, no traceback) or analysed normally; the app then answers a valid request; nothing is
written outside temporary folders."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import gradio as gr
import pytest
from app_helpers import launch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from hostile_inputs import IMAGE_CASES, VALID_IMAGE, VIDEO_CASES, HostileCase, write_animated_gif
from PIL import Image
from test_cli import make_fake_busi, run_main

import kdcore.app.video
from kdcore.config import CLASS_NAMES, DEFAULT_DATA_DIR, REPO_ROOT
from kdcore.imaging import IMAGE_SUFFIXES

SERVER_PATH = re.compile(r"(?<![\w.])/(tmp|home|work|usr|root|proc|etc|var)/")
TOOL_CACHES = re.compile(r"__pycache__|\.pytest_cache|\.ruff_cache")
SHARED_DIR = DEFAULT_DATA_DIR.parent.parent


def case_ids(cases: tuple[HostileCase, ...]) -> list[str]:
    return [case.name for case in cases]


def assert_clean_message(message: str, refusal: str) -> None:
    """Names the problem, and gives away neither a server path nor a stack trace."""
    assert re.search(refusal, message), message
    assert not SERVER_PATH.search(message), message
    assert "Traceback" not in message and 'File "' not in message, message


def assert_valid_payload(payload: dict) -> None:
    assert set(payload) == {"teacher", "student"}
    for result in payload.values():
        assert result["label"] in CLASS_NAMES
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def repo_files_not_in_git() -> set[str]:
    """Untracked and ignored paths of the repository, tool caches (bytecode, pytest, ruff) aside."""
    listing = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return {line for line in listing if not TOOL_CACHES.search(line)}


def shared_files() -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in SHARED_DIR.rglob("*") if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def nothing_written_outside_temporary_folders() -> Iterator[None]:
    repo_before, shared_before = repo_files_not_in_git(), shared_files()
    yield
    assert repo_files_not_in_git() - repo_before == set()
    assert shared_files() == shared_before, "../shared changed"


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile")
    for case in (*IMAGE_CASES, *VIDEO_CASES):
        case.make(folder)
    return folder


@pytest.fixture(scope="module")
def app(tiny_checkpoints) -> Iterator[gr.Blocks]:
    demo = launch(tiny_checkpoints["student"].parent)
    yield demo
    demo.close()


@pytest.fixture(scope="module")
def client(app) -> Client:
    return Client(app.local_url, verbose=False)


def event_handler(demo: gr.Blocks, api_name: str) -> Callable:
    """The function behind one of the app's events, as Gradio calls it."""
    return next(fn.fn for fn in demo.fns.values() if fn.api_name == api_name)


def run_handler(demo: gr.Blocks, case: HostileCase, path: Path):
    """What the browser would get: the image handler's outputs, or the video handler's last yield."""
    if case in VIDEO_CASES:
        return list(event_handler(demo, "analyse_video")(str(path), 0.4))[-1]
    return event_handler(demo, "predict")(str(path), 0.0)


# ----------------------------------------------------------------------------- handlers


@pytest.mark.parametrize("case", IMAGE_CASES + VIDEO_CASES, ids=case_ids(IMAGE_CASES + VIDEO_CASES))
def test_handler_refuses_or_analyses(app, hostile_dir, case, monkeypatch):
    monkeypatch.setattr(kdcore.app.video, "MAX_CLIP_SECONDS", 2.0)  # the long clip: analyse 2 s, not 60
    path = hostile_dir / case.filename
    if case.refusal is None:
        outputs = run_handler(app, case, path)
        if case in VIDEO_CASES:
            assert "Clip summary" in outputs[-1] and "only the first 2 s" in outputs[-1]
        else:
            assert_valid_payload(outputs[0])
        return
    with pytest.raises(gr.Error) as error:
        run_handler(app, case, path)
    assert_clean_message(error.value.message, case.refusal)


def test_exif_orientation_is_applied(app, hostile_dir):
    *_, student_overlay, _ = event_handler(app, "predict")(str(hostile_dir / "rotated.jpg"), 0.0)
    assert student_overlay.shape[:2] == (160, 120)  # stored 160 wide, shown upright 120 wide
    brightness = student_overlay[..., 0].astype(float)
    assert brightness[:20].mean() > 200 and brightness[40:].mean() < 100  # the bright band is on top


def test_animated_gif_uses_its_first_frame(app, tmp_path):
    write_animated_gif(tmp_path / "cine.gif")
    *_, student_overlay, _ = event_handler(app, "predict")(str(tmp_path / "cine.gif"), 0.0)
    assert student_overlay[..., 0].mean() == pytest.approx(20, abs=2)


def test_very_long_clip_is_capped_at_sixty_seconds(hostile_dir):
    info = kdcore.app.video.probe_clip(hostile_dir / "long.avi")
    assert info.total_frames == 70 and info.frames_to_analyse == 60
    assert "70 s long; only the first 60 s" in info.cap_message
    assert sum(1 for _ in kdcore.app.video.iter_grey_frames(hostile_dir / "long.avi", info)) == 60


# ----------------------------------------------------------------------------- live app (gradio_client)


def call_api(client: Client, case: HostileCase, path: Path, image_api: str):
    if case in VIDEO_CASES:
        return client.predict(handle_file(path), 0.4, api_name="/analyse_video")
    return client.predict(handle_file(path), api_name=image_api)


API_CASES = [(case, "/predict") for case in IMAGE_CASES + VIDEO_CASES]
API_CASES += [(case, "/predict_image") for case in IMAGE_CASES]


@pytest.mark.parametrize(
    ("case", "image_api"), API_CASES, ids=[f"{api.strip('/')}-{case.name}" for case, api in API_CASES]
)
def test_api_refuses_clearly_then_keeps_serving(client, hostile_dir, case, image_api, monkeypatch):
    """Through the file box (/predict), the paste box (/predict_image) and the video tab."""
    monkeypatch.setattr(kdcore.app.video, "MAX_CLIP_SECONDS", 2.0)  # in-process server: same module
    path = hostile_dir / case.filename
    if case.refusal is None:
        outputs = call_api(client, case, path, image_api)
        if case in VIDEO_CASES:
            assert "only the first 2 s" in outputs[-1]
        else:
            assert_valid_payload(outputs[0])
        return
    with pytest.raises(AppError) as error:
        call_api(client, case, path, image_api)
    assert_clean_message(str(error.value), case.refusal)
    payload, *_ = client.predict(handle_file(VALID_IMAGE), api_name="/predict")
    assert_valid_payload(payload)


def test_api_shows_exif_rotated_image_upright(client, hostile_dir):
    _, _, student_overlay = client.predict(handle_file(hostile_dir / "rotated.jpg"), api_name="/predict")
    with Image.open(student_overlay) as shown:
        assert shown.size == (120, 160)


# ----------------------------------------------------------------------------- train.py


READABLE_BY_CLI = [c for c in IMAGE_CASES if Path(c.filename).suffix in IMAGE_SUFFIXES]


@pytest.mark.parametrize("case", READABLE_BY_CLI, ids=case_ids(READABLE_BY_CLI))
def test_evaluate_names_the_bad_file_or_scores_it(tmp_path, hostile_dir, tiny_checkpoints, case, capsys):
    data = tmp_path / "scans"
    (data / "benign").mkdir(parents=True)
    (data / "benign" / case.filename).write_bytes((hostile_dir / case.filename).read_bytes())
    out = tmp_path / "scores.json"
    code, stdout, err = run_main(
        capsys, "evaluate", "--checkpoint", tiny_checkpoints["student"], "--data", data, "--out", out
    )
    if case.refusal is None:
        assert code == 0 and '"n": 1' in stdout
        return
    assert code == 2 and not out.exists()
    assert case.filename in err and re.search(case.refusal, err) and "Traceback" not in err


def test_training_names_an_unreadable_image_even_with_allow_data_mismatch(tmp_path, hostile_dir, capsys):
    data = tmp_path / "busi"
    split_file = make_fake_busi(data)
    (data / "benign" / "benign (1).png").write_bytes((hostile_dir / "truncated.png").read_bytes())
    code, _, err = run_main(
        capsys, "teacher", "--data", data, "--split-file", split_file, "--allow-data-mismatch",
        "--out", tmp_path / "t", "--epochs", "1",
    )  # fmt: skip
    assert code == 2 and "benign (1).png" in err and "corrupt or truncated" in err
    assert not (tmp_path / "t.safetensors").exists()


@pytest.mark.parametrize("command", ["teacher", "evaluate"])
def test_missing_data_folder_is_named(tmp_path, tiny_checkpoints, command, capsys):
    missing = tmp_path / "no_such_folder"
    extra = ["--checkpoint", tiny_checkpoints["student"]] if command == "evaluate" else []
    code, _, err = run_main(capsys, command, "--data", missing, "--out", tmp_path / "out.json", *extra)
    assert code == 2 and "no_such_folder" in err and "Traceback" not in err
