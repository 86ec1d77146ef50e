"""Image decoding and validation: any file in, an RGB array of the model's input size out.

Every failure raises a domain error whose message is the reason a user sees (in an error
row of the embeddings, or as the one-line CLI error for a query image).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from services.common import metrics
from services.common.errors import ImsearchError, InvalidInput, TooLarge

BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"RIFF": "WebP", b"BM": "BMP",
         b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


def _sniff(data: bytes) -> str | None:
    return next((fmt for magic, fmt in MAGIC.items() if data.startswith(magic)), None)


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # (size, size, 3) uint8
    width: int  # of the original, after EXIF orientation
    height: int


def _open(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    if not data:
        raise InvalidInput("empty file (0 bytes)")
    if len(data) > max_bytes:
        raise TooLarge(f"file too large: {len(data)} bytes > limit {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        fmt = _sniff(data)
        if fmt:
            raise InvalidInput(f"corrupt image: starts like {fmt} but the header cannot be read") from None
        raise InvalidInput("not an image: unknown or unsupported format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooLarge("decompression bomb: pixel count over Pillow's safety limit") from None
    except Exception as e:  # Pillow plugins raise many types on malformed headers
        raise InvalidInput(f"corrupt image header: {type(e).__name__}: {str(e)[:200]}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise InvalidInput(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise TooLarge(f"decompression bomb: {w}x{h} = {w * h / 1e6:.0f} Mpx > limit {max_pixels / 1e6:.0f} Mpx")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in SIXTEEN_BIT_MODES:
        a = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" or (img.mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    w, h = img.size
    return (h, w) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


def probe_image(data: bytes, max_bytes: int, max_pixels: int) -> tuple[str, str, int, int]:
    """(format, mode, width, height after EXIF orientation) from the header alone: the same checks as
    decode_image, for images whose pixels are decoded elsewhere (on the GPU)."""
    img = _open(data, max_bytes, max_pixels)
    try:
        return (img.format or "", img.mode, *_oriented_size(img))
    except Exception as e:  # noqa: BLE001 - untrusted bytes
        raise InvalidInput(f"corrupt image: {type(e).__name__}: {str(e)[:200]}") from None


for _result in ("ok", "refused"):  # both series exist from the start: the refused ratio reads 0, not nothing
    metrics.IMAGES_DECODED.labels(_result)


def decode_image(data: bytes, size: int, max_bytes: int, max_pixels: int) -> Decoded:
    """Decode, orient by EXIF, flatten alpha, convert to 8-bit RGB and resize to size x size."""
    try:
        out = _decode(data, size, max_bytes, max_pixels)
    except ImsearchError:
        metrics.IMAGES_DECODED.labels("refused").inc()
        raise
    metrics.IMAGES_DECODED.labels("ok").inc()
    return out


def _decode(data: bytes, size: int, max_bytes: int, max_pixels: int) -> Decoded:
    img = _open(data, max_bytes, max_pixels)
    try:
        img.seek(0)  # animated images: the first frame
        w, h = _oriented_size(img)
        if img.format == "JPEG":
            img.draft("RGB", (size, size))  # DCT-domain downscale: much faster decode of big JPEGs
        img.load()
        img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img).resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
        return Decoded(np.asarray(rgb, dtype=np.uint8), w, h)
    except OSError as e:
        raise InvalidInput(f"truncated or corrupt image data: {e}") from None
    except Exception as e:  # noqa: BLE001 - untrusted bytes: any decoder failure is the input's, not ours
        raise InvalidInput(f"corrupt image: {type(e).__name__}: {str(e)[:200]}") from None


def thumbnail(data: bytes, side: int, max_bytes: int, max_pixels: int) -> Image.Image:
    """The image at most side x side (aspect kept), as the model sees it before resizing: oriented by EXIF,
    alpha flattened; the same checks as decode_image (empty, corrupt, bombs)."""
    img = _open(data, max_bytes, max_pixels)
    try:
        img.seek(0)
        if img.format == "JPEG":
            img.draft("RGB", (side, side))
        img.load()
        img = _to_rgb(ImageOps.exif_transpose(img))
        img.thumbnail((side, side), Image.Resampling.BICUBIC)
        return img
    except Exception as e:  # noqa: BLE001 - untrusted bytes
        raise InvalidInput(f"corrupt image: {type(e).__name__}: {str(e)[:200]}") from None


def thumbnail_jpeg(data: bytes, side: int, max_bytes: int, max_pixels: int) -> bytes:
    """thumbnail() as a JPEG."""
    buf = io.BytesIO()
    thumbnail(data, side, max_bytes, max_pixels).save(buf, "JPEG", quality=85)
    return buf.getvalue()
