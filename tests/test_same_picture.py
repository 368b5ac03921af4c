"""One picture, one answer: the image, live and video paths (and training's reader) turn the
same lossless picture into the same grey array and the same student probabilities."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from kdcore.app import handlers
from kdcore.app.live_session import LiveSession, RegionOfInterest
from kdcore.app.service import load_models
from kdcore.app.video import analyse_clip, iter_grey_frames, probe_clip
from kdcore.imaging import grey_from_bgr, read_grey_image

TOLERANCE = 1e-5


def _pictures() -> dict[str, np.ndarray]:
    """HxWx3 RGB pictures: grey speckle (channels equal) and a colour one (channels differ)."""
    rng = np.random.default_rng(7)
    grey = np.clip(rng.rayleigh(55, (240, 320)), 0, 255).astype(np.uint8)
    grey[80:160, 120:200] //= 3  # a dark 'lesion'
    colour = np.stack([grey, np.roll(grey, 40, axis=1), 255 - grey], axis=-1)  # R, G, B all different
    return {"grey": np.repeat(grey[..., None], 3, axis=-1), "colour": colour}


def _lossless_clip(rgb: np.ndarray, path: Path) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 10, (rgb.shape[1], rgb.shape[0]))
    for _ in range(3):
        writer.write(np.ascontiguousarray(rgb[..., ::-1]))  # OpenCV writes BGR
    writer.release()
    return path


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return load_models(tiny_checkpoints["student"].parent)


@pytest.mark.parametrize("name", ["grey", "colour"])
def test_image_live_and_video_paths_agree(models, tmp_path, name):
    rgb = _pictures()[name]
    png = tmp_path / f"{name}.png"
    Image.fromarray(rgb).save(png)
    clip = _lossless_clip(rgb, tmp_path / f"{name}.avi")
    bgr = np.ascontiguousarray(rgb[..., ::-1])

    # The same grey array, whichever way the picture arrives.
    from_upload = read_grey_image(png)
    from_video = next(iter_grey_frames(clip, probe_clip(clip)))
    np.testing.assert_array_equal(grey_from_bgr(bgr), from_upload)
    np.testing.assert_array_equal(from_video, from_upload)

    image_json, *_ = handlers.predict(models, str(png), 0.4)
    live = LiveSession().process(models.student_cam, bgr, RegionOfInterest(), smoothing=0.0, opacity=0.4)
    _, first_frame = next(analyse_clip(models.student_cam, clip, probe_clip(clip), 0.4))

    expected = image_json["student"]["probabilities"]
    assert live.probabilities == pytest.approx(expected, abs=TOLERANCE)
    assert first_frame.probabilities == pytest.approx(expected, abs=TOLERANCE)
    assert live.label == first_frame.label == image_json["student"]["label"]


def test_video_frames_are_not_contrast_stretched(tmp_path):
    """A dim clip stays dim: frames are converted like uploads, not rescaled to 0..255 each."""
    dim = np.full((64, 64, 3), 40, np.uint8)
    dim[16:48, 16:48] = 90
    clip = _lossless_clip(dim, tmp_path / "dim.avi")
    frame = next(iter_grey_frames(clip, probe_clip(clip)))
    assert (frame.min(), frame.max()) == (40, 90)
