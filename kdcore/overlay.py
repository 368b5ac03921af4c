"""Drawing heat-maps: JET overlays on grey images, JPEG frames, and the heat-map peak."""

from __future__ import annotations

import cv2
import numpy as np

JPEG_QUALITY = 90


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, opacity: float = 0.4) -> np.ndarray:
    """RGB uint8 image with a JET-coloured heat-map blended in at ``opacity``."""
    rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image
    height, width = rgb.shape[:2]
    resized = cv2.resize(np.clip(heatmap, 0, 1), (width, height), interpolation=cv2.INTER_LINEAR)
    coloured = cv2.applyColorMap((resized * 255).astype(np.uint8), cv2.COLORMAP_JET)
    coloured = cv2.cvtColor(coloured, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(rgb, 1.0 - float(opacity), coloured, float(opacity), 0.0)


def colour_scale_html(stops: int = 9) -> str:
    """A horizontal bar of the overlay's colour map (OpenCV's JET, sampled, so it matches
    exactly), labelled low to high: the legend of every Grad-CAM panel."""
    ramp = np.linspace(0, 255, stops).astype(np.uint8).reshape(-1, 1)
    colours = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)[:, 0, ::-1]  # BGR -> RGB
    gradient = ", ".join(f"rgb({r},{g},{b}) {100 * i / (stops - 1):.0f}%" for i, (r, g, b) in enumerate(colours))
    bar = f'<div style="height:12px;border-radius:3px;background:linear-gradient(to right, {gradient})"></div>'
    labels = (
        '<div style="display:flex;justify-content:space-between;font-size:12px"><span>low</span>'
        "<span>Grad-CAM: evidence for the class named above each panel</span><span>high</span></div>"
    )
    return f'<div class="cam-scale">{bar}{labels}</div>'


def encode_jpeg(frame_bgr: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of a BGR frame (what the live and video streams send)."""
    ok, encoded = cv2.imencode(".jpg", frame_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return encoded.tobytes()


def cam_peak(heatmap: np.ndarray, height: int, width: int) -> tuple[int, int]:
    """(row, col) of the heat-map maximum, in an image of the given size."""
    resized = cv2.resize(heatmap, (width, height), interpolation=cv2.INTER_LINEAR)
    row, col = np.unravel_index(int(np.argmax(resized)), resized.shape)
    return int(row), int(col)
