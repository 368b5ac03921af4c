"""Reading user images safely: every accepted file becomes an 8-bit grey array."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000  # ~6300x6300; larger files are refused before decoding
MAX_FILE_BYTES = 50 * 1024 * 1024
MIN_SIDE = 16
MAX_ASPECT = 20.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".dcm")


class ImageReadError(ValueError):
    """A file that is not a usable image; the message is meant for the user."""


def _check_geometry(width: int, height: int, name: str) -> None:
    if width * height > MAX_PIXELS:
        raise ImageReadError(
            f"{name}: image is {width}x{height} pixels, larger than the "
            f"{MAX_PIXELS // 1_000_000} megapixel limit; downscale it first."
        )
    if min(width, height) < MIN_SIDE:
        raise ImageReadError(f"{name}: image is only {width}x{height} pixels; need at least {MIN_SIDE}.")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ImageReadError(f"{name}: image is {width}x{height}, too elongated to be an ultrasound frame.")


def _read_dicom(data: bytes, name: str) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for bad files
        raise ImageReadError(f"{name}: not a readable DICOM image ({type(exc).__name__}).") from exc
    if pixels.ndim == 4 or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
        pixels = pixels[0]  # multi-frame: take the first frame
    return grey_from_array(pixels.astype(np.float64), name)


def grey_from_array(pixels: np.ndarray, name: str = "image", channel_order: str = "RGB") -> np.ndarray:
    """THE grey conversion, for every path (uploads, training, live frames, video frames).

    Any 2-D grey or HxWx3/4 colour array -> HxW uint8. 8-bit colour uses ITU-R 601 luma
    (OpenCV's fixed-point ``cvtColor``) in the given ``channel_order`` ("RGB", or "BGR" for
    OpenCV frames) and is never rescaled; deeper or float data (16-bit TIFF, DICOM) is mapped
    from its own min..max to 0..255.
    """
    if channel_order not in ("RGB", "BGR"):
        raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
    if pixels.ndim == 3:
        if pixels.shape[-1] == 4:
            pixels = pixels[..., :3]
        if pixels.shape[-1] != 3:
            raise ImageReadError(f"{name}: unsupported channel count {pixels.shape[-1]}.")
        if pixels.dtype == np.uint8:
            code = cv2.COLOR_RGB2GRAY if channel_order == "RGB" else cv2.COLOR_BGR2GRAY
            pixels = cv2.cvtColor(np.ascontiguousarray(pixels), code)
        else:
            weights = np.array([0.299, 0.587, 0.114])
            pixels = pixels.astype(np.float64) @ (weights if channel_order == "RGB" else weights[::-1])
    if pixels.ndim != 2:
        raise ImageReadError(f"{name}: expected a 2-D image, got shape {pixels.shape}.")
    _check_geometry(pixels.shape[1], pixels.shape[0], name)
    if pixels.dtype == np.uint8:
        return np.ascontiguousarray(pixels)
    lo, hi = float(np.min(pixels)), float(np.max(pixels))
    if not np.isfinite([lo, hi]).all():
        raise ImageReadError(f"{name}: image contains non-finite values.")
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return ((pixels - lo) * scale).round().astype(np.uint8)


COLOUR_LEVELS = 24  # channels further apart than this are colour, not compression noise on grey
COLOUR_WARNING_SHARE = 0.2  # more colour than this is not a B-mode scan (BUSI: at most 1 %, BrEaST: 11 %)


def colour_share(pixels: np.ndarray, step: int = 4) -> float:
    """Share of (every ``step``-th) pixels whose colour channels differ by more than
    ``COLOUR_LEVELS``; 0 for a grey array. B-mode ultrasound is grey."""
    if pixels.ndim != 3 or pixels.shape[-1] < 3:
        return 0.0
    sample = pixels[::step, ::step, :3].astype(np.int16)
    return float((sample.max(axis=-1) - sample.min(axis=-1) > COLOUR_LEVELS).mean())


def file_colour_share(path: str | Path) -> float:
    """``colour_share`` of an image file, on a 256-px thumbnail; 0 for grey, DICOM or files PIL
    cannot open (``read_grey_image`` reports those)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
                return 0.0
            img.thumbnail((256, 256))
            return colour_share(np.asarray(img.convert("RGB")), step=1)
    except Exception:  # noqa: BLE001 (a check, not a reader: the grey reader names the problem)
        return 0.0


def not_bmode_warning(share: float) -> str:
    """Empty for a grey picture; else a plain warning that it does not look like B-mode ultrasound."""
    if share <= COLOUR_WARNING_SHARE:
        return ""
    return (
        f"⚠ **This does not look like a B-mode ultrasound image**: {share:.0%} of it is in colour, "
        "and the models were trained on grey scans only. Do not trust the result."
    )


def grey_from_bgr(frame: np.ndarray, name: str = "frame") -> np.ndarray:
    """An OpenCV (camera or video) frame -> HxW uint8, by the same conversion as uploads."""
    return grey_from_array(frame, name, channel_order="BGR")


def grey_from_pil(img: Image.Image, name: str = "image") -> np.ndarray:
    """PIL image of any mode -> upright HxW uint8 grey array (via ``grey_from_array``)."""
    _check_geometry(img.width, img.height, name)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return grey_from_array(np.asarray(img, dtype=np.float64), name)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on black: transparent areas are background, like the scanner's.
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    if img.mode == "L":
        return np.asarray(img, dtype=np.uint8).copy()
    return grey_from_array(np.asarray(img.convert("RGB"), dtype=np.uint8), name)


def read_grey_image(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """Read an image file (or bytes) into an HxW uint8 array, or raise ImageReadError.

    Accepts PNG, JPEG, BMP, TIFF, WebP, GIF (first frame) and DICOM. Refuses empty,
    truncated, non-image, oversize and decompression-bomb files with a clear message.
    """
    if isinstance(source, bytes):
        data, name = source, name or "upload"
    else:
        path = Path(source)
        name = name or path.name
        if not path.is_file():
            raise ImageReadError(f"{name}: file not found.")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ImageReadError(f"{name}: file is larger than {MAX_FILE_BYTES // 2**20} MB.")
        data = path.read_bytes()
    if not data:
        raise ImageReadError(f"{name}: file is empty.")
    if len(data) > 132 and data[128:132] == b"DICM":
        return _read_dicom(data, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                _check_geometry(img.width, img.height, name)
                img.load()
                return grey_from_pil(img, name)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(f"{name}: image is too large to decode safely.") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{name}: not a supported image (use PNG, JPEG, BMP, TIFF, WebP, GIF or DICOM).") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{name}: image file is corrupt or truncated ({exc}).") from exc
