import io

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidInput, TooLarge
from services.common.images import decode_image
from tests.helpers import encode, jpeg_with_orientation, pattern

SIZE = 32
LIMITS = dict(max_bytes=10_000_000, max_pixels=4_000_000)


def decode(data: bytes):
    return decode_image(data, SIZE, **LIMITS)


def test_plain_png_decodes_to_rgb_of_the_input_size():
    d = decode(encode(pattern(64, 48)))
    assert d.pixels.shape == (SIZE, SIZE, 3) and d.pixels.dtype == np.uint8
    assert (d.width, d.height) == (64, 48)
    assert d.pixels.std() > 10  # real content, not a blank


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"this is a text file, not an image" * 10, "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt"),
])
def test_unreadable_bytes_raise_with_reason(data, reason):
    with pytest.raises(InvalidInput, match=reason):
        decode(data)


def test_truncated_jpeg_is_an_error_not_a_crash():
    data = encode(pattern(256, 256), "JPEG", quality=90)
    with pytest.raises(InvalidInput, match="truncated|corrupt"):
        decode(data[: len(data) // 2])


def test_truncated_png_is_an_error():
    data = encode(pattern(256, 256), "PNG")
    with pytest.raises(InvalidInput, match="truncated|corrupt"):
        decode(data[: len(data) // 2])


def test_decompression_bomb_is_refused_before_decoding():
    # 5000 x 5000 of one colour compresses to a few KB but is 25 Mpx > the 4 Mpx limit.
    data = encode(Image.new("L", (5000, 5000)), "PNG", optimize=True)
    assert len(data) < 100_000
    with pytest.raises(TooLarge, match="decompression bomb"):
        decode(data)


def test_file_over_byte_limit_is_refused():
    with pytest.raises(TooLarge, match="too large"):
        decode_image(encode(pattern(), "PNG"), SIZE, max_bytes=100, max_pixels=10**6)


def test_cmyk_jpeg_converts_to_rgb():
    d = decode(encode(pattern().convert("CMYK"), "JPEG"))
    assert d.pixels.shape == (SIZE, SIZE, 3)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    a = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    data = encode(Image.fromarray(a), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    d = decode(data)
    # A naive convert() clips everything above 255 to white; scaled, the mean stays mid-grey.
    assert 100 < d.pixels.mean() < 155


def test_palette_with_transparency_is_composited_on_white():
    img = Image.new("P", (40, 40), 0)
    img.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    img.info["transparency"] = 0  # index 0 (black) is transparent
    img.paste(1, (10, 10, 30, 30))  # a red square in the middle
    d = decode(encode(img, "PNG", transparency=0))
    assert tuple(d.pixels[0, 0]) == (255, 255, 255)  # transparent corner -> white, not black
    assert tuple(d.pixels[SIZE // 2, SIZE // 2]) == (255, 0, 0)


def test_rgba_alpha_is_composited_on_white():
    a = np.zeros((40, 40, 4), np.uint8)
    a[..., 2] = 255  # blue, fully transparent
    d = decode(encode(Image.fromarray(a, "RGBA")))
    assert (d.pixels == 255).all()


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    d = decode(buf.getvalue())
    r, g, b = d.pixels.reshape(-1, 3).mean(0)
    assert r > 200 and g < 50 and b < 50


def test_exif_rotation_is_applied():
    # Left half black, right half white; orientation 6 = rotate 90° clockwise on display.
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, 40:] = 255
    d = decode(jpeg_with_orientation(Image.fromarray(a), 6))
    assert (d.width, d.height) == (40, 80)  # portrait after transposition
    top, bottom = d.pixels[: SIZE // 2 - 2].mean(), d.pixels[SIZE // 2 + 2:].mean()
    assert top < 60 and bottom > 200  # the black half is now on top


def test_greyscale_and_la_modes_become_rgb():
    for mode in ("L", "LA", "1"):
        d = decode(encode(pattern().convert(mode), "PNG"))
        assert d.pixels.shape == (SIZE, SIZE, 3)
