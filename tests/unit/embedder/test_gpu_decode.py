"""The device-side JPEG path, run on the CPU device here: it must give what the Pillow path gives."""

import numpy as np

from services.common.images import decode_image
from services.embedder.gpu_decode import decode_on_device
from tests.helpers import encode, jpeg_with_orientation, pattern

LIMITS = (50 * 2**20, 64 * 10**6)


def test_device_decode_matches_pillow_including_exif_orientation():
    blobs = [encode(pattern(320, 240, seed=1), "JPEG", quality=95),
             jpeg_with_orientation(pattern(300, 200, seed=2), 6),
             encode(pattern(150, 150, seed=3).convert("L"), "JPEG", quality=95)]
    got = decode_on_device(blobs, 224, "cpu").numpy()
    assert got.shape == (3, 224, 224, 3) and got.dtype == np.uint8
    for blob, pixels in zip(blobs, got):
        want = decode_image(blob, 224, *LIMITS).pixels.astype(np.float32)
        assert np.abs(pixels.astype(np.float32) - want).mean() < 6  # same image; resamplers differ slightly
    other = decode_image(blobs[0], 224, *LIMITS).pixels.astype(np.float32)
    assert np.abs(got[1].astype(np.float32) - other).mean() > 20  # and the check above can tell images apart
