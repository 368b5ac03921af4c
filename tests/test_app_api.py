"""The app launched in-process and called through gradio_client, as an API user would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from app_helpers import launch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from kdcore.app.layout import AppSettings, launch_options
from kdcore.config import CLASS_NAMES

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@pytest.fixture(scope="module")
def client(tiny_checkpoints):
    demo = launch(tiny_checkpoints["student"].parent)
    yield Client(demo.local_url, verbose=False)
    demo.close()


def test_launch_options_are_local_and_bounded():
    options = launch_options(AppSettings())
    assert options["server_name"] == "127.0.0.1" and options["share"] is False
    assert options["max_file_size"]


def test_predict_on_a_busi_image(client, busi_dir):
    image = next((busi_dir / "malignant").glob("malignant (*).png"))
    payload, teacher_overlay, student_overlay = client.predict(handle_file(image), api_name="/predict")
    assert set(payload) == {"teacher", "student"}
    for result in payload.values():
        assert result["label"] in CLASS_NAMES
        assert set(result["probabilities"]) == set(CLASS_NAMES)
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert result["latency_ms"] > 0
    with Image.open(image) as original:
        size = original.size
    for overlay in (teacher_overlay, student_overlay):
        with Image.open(overlay) as shown:
            assert shown.size == size and shown.mode == "RGB"


def test_predict_accepts_dicom_and_16_bit_tiff(client, tmp_path):
    from pydicom.data import get_testdata_file

    tiff = tmp_path / "scan16.tiff"
    Image.fromarray(np.arange(256 * 256, dtype=np.uint16).reshape(256, 256) * 3).save(tiff)
    for path in (Path(get_testdata_file("MR_small.dcm")), tiff):
        payload, teacher_overlay, _ = client.predict(handle_file(path), api_name="/predict")
        assert set(payload) == {"teacher", "student"}
        with Image.open(teacher_overlay) as shown:
            assert shown.mode == "RGB" and min(shown.size) >= 64


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.png", b"", "empty"),
        ("corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "corrupt"),
        ("letter.jpg", b"Dear colleague, this is not an image.", "not a supported image"),
    ],
)
def test_predict_bad_inputs_give_clear_errors_and_app_keeps_serving(client, tmp_path, name, content, message):
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(AppError, match=message) as error:
        client.predict(handle_file(bad), api_name="/predict")
    assert str(tmp_path) not in str(error.value) and "Traceback" not in str(error.value)
    payload, *_ = client.predict(handle_file(ASSETS / "phantom_round_lesion.png"), api_name="/predict")
    assert set(payload) == {"teacher", "student"}


def test_huge_image_is_refused(client, tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("L", (8000, 6000)).save(huge)
    with pytest.raises(AppError, match="megapixel limit"):
        client.predict(handle_file(huge), api_name="/predict")


def test_unreadable_video_gives_clear_error(client, tmp_path):
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 500)
    with pytest.raises(AppError, match="not a readable video"):
        client.predict(handle_file(bad), 0.4, api_name="/analyse_video")


def test_video_api_returns_timeline_and_summary(client):
    *_, summary = client.predict(handle_file(ASSETS / "phantom_sweep.mp4"), 0.4, api_name="/analyse_video")
    assert "Clip summary" in summary and "20 frames analysed" in summary


def test_app_starts_without_checkpoints_and_says_so(tmp_path):
    demo = launch(tmp_path)
    try:
        config = demo.get_config_file()
        texts = [c.get("props", {}).get("value") for c in config["components"]]
        status = next(t for t in texts if isinstance(t, str) and "not available" in t)
        assert "teacher" in status and "student" in status and "python train.py all" in status
        assert str(tmp_path) not in status
        with pytest.raises(AppError, match="No model is loaded"):
            Client(demo.local_url, verbose=False).predict(
                handle_file(ASSETS / "phantom_round_lesion.png"), api_name="/predict"
            )
    finally:
        demo.close()
