"""Hostile files a clinician might drop on the app, generated at test time (nothing committed).

Each ``HostileCase`` writes its file into a folder and says what the app must answer: an
error matching ``refusal`` (a regular expression naming the problem), or a normal result
when ``refusal`` is None. Layers word some refusals differently (Gradio itself refuses a
suffix outside the upload box's ``file_types`` before our code runs), hence the alternatives.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ASSETS = Path(__file__).resolve().parent.parent / "assets"
VALID_IMAGE = ASSETS / "phantom_round_lesion.png"
VALID_CLIP = ASSETS / "phantom_sweep.mp4"
LONG_CLIP_SECONDS = 70  # above the app's 60 s cap
WRONG_SUFFIX = "Invalid file type|not a supported"


@dataclass(frozen=True)
class HostileCase:
    name: str
    filename: str
    write: Callable[[Path], None]
    refusal: str | None  # regex of the expected error message; None = must be analysed normally

    def make(self, folder: Path) -> Path:
        path = folder / self.filename
        self.write(path)
        return path


def speckle(height: int = 120, width: int = 160, seed: int = 0) -> np.ndarray:
    """Small grey ultrasound-like frame."""
    return np.random.default_rng(seed).rayleigh(50, (height, width)).clip(0, 255).astype(np.uint8)


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes, extra: bytes = b"") -> bytes:
    """A hand-assembled PNG: lets the header claim any size, whatever the pixel data."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    chunks = png_chunk(b"IHDR", header) + extra + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _bytes(content: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(content)


def _generated(factory: Callable[[], bytes]) -> Callable[[Path], None]:
    """Bytes made only when the case is written (the bombs take a moment to compress)."""
    return lambda path: path.write_bytes(factory())


def _pil(image_factory: Callable[[], Image.Image], fmt: str, **options) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(_encoded(image_factory(), fmt, **options))


def _truncated(content: bytes) -> Callable[[Path], None]:
    return _bytes(content[: len(content) // 2])


def write_exif_rotated_jpeg(path: Path) -> None:
    """Stored landscape 160x120 with a bright left edge; EXIF orientation 6 = rotate 90° clockwise,
    so the upright image is portrait 120x160 with the bright band along its top."""
    pixels = speckle() // 4
    pixels[:, :20] = 250
    exif = Image.Exif()
    exif[0x0112] = 6
    path.write_bytes(_encoded(Image.fromarray(pixels), "JPEG", exif=exif, quality=95))


def write_animated_gif(path: Path) -> None:
    """Three frames; the first is dark, the others bright (the app must read the first)."""
    frames = [Image.fromarray(np.full((120, 160), value, np.uint8)) for value in (20, 230, 230)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def write_alpha_png(path: Path) -> None:
    rgba = np.dstack([np.dstack([speckle()] * 3), np.full((120, 160), 255, np.uint8)])
    rgba[:, :80, 3] = 0  # left half transparent
    Image.fromarray(rgba, "RGBA").save(path)


def write_palette_png(path: Path) -> None:
    Image.fromarray(np.dstack([speckle()] * 3)).quantize(16).save(path)


def write_cmyk_jpeg(path: Path) -> None:
    Image.fromarray(np.dstack([speckle()] * 3)).convert("CMYK").save(path, quality=90)


def write_nan_tiff(path: Path) -> None:
    pixels = speckle().astype(np.float32)
    pixels[10, 10] = np.nan
    Image.fromarray(pixels, "F").save(path)


def huge_header_png() -> bytes:
    """A 74-byte PNG whose header claims 20000x20000 pixels."""
    return png_bytes(20_000, 20_000, 8, 0, zlib.compress(b"\0" * 1000))


def decompression_bomb() -> bytes:
    """10000x10000 1-bit PNG of zeros: 12 kB on disk, 100 megapixels once decoded."""
    side = 10_000
    rows = (b"\x00" * (1 + side // 8)) * side
    return png_bytes(side, side, 1, 0, zlib.compress(rows, 9))


def text_chunk_bomb() -> bytes:
    """Valid 64x64 PNG whose compressed text chunk inflates to 64 MB (over Pillow's chunk limit)."""
    text = b"Comment\x00\x00" + zlib.compress(b"A" * (64 << 20), 9)
    rows = (b"\x00" + b"\x80" * 64) * 64
    return png_bytes(64, 64, 8, 0, zlib.compress(rows), extra=png_chunk(b"zTXt", text))


def fake_dicom() -> bytes:
    return b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI" + b"\xff" * 200


def write_clip(path: Path, frames: int, fps: float, size: tuple[int, int] = (64, 48), fourcc: str = "MJPG") -> None:
    """A small speckle clip (``frames`` may be 0: a container with no frame)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    assert writer.isOpened(), f"OpenCV cannot write {fourcc} into {path.suffix}"
    for index in range(frames):
        writer.write(cv2.cvtColor(speckle(size[1], size[0], seed=index), cv2.COLOR_GRAY2BGR))
    writer.release()


def write_unknown_codec_avi(path: Path) -> None:
    """A valid AVI whose codec tag (FourCC) names a codec no decoder knows."""
    write_clip(path, 5, 10)
    path.write_bytes(path.read_bytes().replace(b"MJPG", b"ZZZZ"))


def _valid_png() -> bytes:
    return _encoded(Image.fromarray(speckle()), "PNG")


def _valid_jpeg() -> bytes:
    return _encoded(Image.fromarray(speckle()), "JPEG", quality=90)


LETTER = b"Dear colleague,\nplease find the scan attached.\n"
HTML = b"<!DOCTYPE html><html><body><script>alert('x')</script></body></html>"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="200" height="200"><circle r="50"/></svg>'

IMAGE_CASES = (
    HostileCase("zero-byte", "empty.png", _bytes(b""), "file is empty"),
    HostileCase("truncated-png", "truncated.png", _truncated(_valid_png()), "corrupt or truncated"),
    HostileCase("truncated-jpeg", "truncated.jpg", _truncated(_valid_jpeg()), "corrupt or truncated"),
    HostileCase("text-as-png", "letter.png", _bytes(LETTER), "not a supported image"),
    HostileCase("html-as-png", "page.png", _bytes(HTML), "not a supported image"),
    HostileCase("svg", "drawing.svg", _bytes(SVG), WRONG_SUFFIX),
    HostileCase("text-file", "notes.txt", _bytes(b"just notes"), WRONG_SUFFIX),
    HostileCase("1x1", "dot.png", _pil(lambda: Image.new("L", (1, 1)), "PNG"), "only 1x1 pixels"),
    HostileCase("1x10000", "line.png", _pil(lambda: Image.new("L", (1, 10_000)), "PNG"), "only 1x10000 pixels"),
    HostileCase("elongated", "strip.png", _pil(lambda: Image.new("L", (40, 1_000)), "PNG"), "too elongated"),
    HostileCase("decompression-bomb", "bomb.png", _generated(decompression_bomb), "too large"),
    HostileCase("20000x20000", "huge.png", _generated(huge_header_png), "too large"),
    HostileCase("text-chunk-bomb", "chunk_bomb.png", _generated(text_chunk_bomb), "corrupt or truncated"),
    HostileCase("nan-float-tiff", "nan.tiff", write_nan_tiff, "non-finite"),
    HostileCase("fake-dicom", "scan.dcm", _bytes(fake_dicom()), "not a readable DICOM"),
    HostileCase(
        "16-bit-png", "deep.png", _pil(lambda: Image.fromarray(speckle().astype(np.uint16) * 257), "PNG"), None
    ),
    HostileCase("cmyk-jpeg", "cmyk.jpg", write_cmyk_jpeg, None),
    HostileCase("palette-png", "palette.png", write_palette_png, None),
    HostileCase("alpha-png", "alpha.png", write_alpha_png, None),
    HostileCase(
        "grey-alpha-png", "grey_alpha.png", _pil(lambda: Image.fromarray(speckle()).convert("LA"), "PNG"), None
    ),
    HostileCase("jpeg-named-png", "really_a_jpeg.png", _bytes(_valid_jpeg()), None),
    HostileCase("exif-rotated-jpeg", "rotated.jpg", write_exif_rotated_jpeg, None),
    HostileCase("animated-gif", "cine.gif", write_animated_gif, None),
)

VIDEO_CASES = (
    HostileCase("zero-byte-video", "empty.mp4", _bytes(b""), "file is empty"),
    HostileCase("no-frames", "no_frames.avi", lambda p: write_clip(p, 0, 10), "no frame could be decoded"),
    HostileCase("truncated-mp4", "truncated.mp4", _truncated(VALID_CLIP.read_bytes()), "no frame could be decoded"),
    HostileCase("unknown-codec", "codec.avi", write_unknown_codec_avi, "no frame could be decoded"),
    HostileCase("text-as-mp4", "letter.mp4", _bytes(b"not a video at all " * 50), "no frame could be decoded"),
    HostileCase("image-as-video", "frame.png", _bytes(_valid_png()), WRONG_SUFFIX),
    HostileCase("tiny-frames", "tiny.avi", lambda p: write_clip(p, 5, 10, size=(8, 8)), "only 8x8 pixels"),
    HostileCase("very-long", "long.avi", lambda p: write_clip(p, LONG_CLIP_SECONDS, 1.0), None),
)
