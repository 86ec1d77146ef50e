"""JPEG decoding on the model's device (nvjpeg through torchvision when it is a GPU).

Used by the model stage only when the model runs on CUDA; Pillow (services/common/images.py)
stays the path for every other image and every machine without a GPU. Pillow still reads each
JPEG's header first, so the size/bomb checks and error rows are the same on both paths.
"""

from __future__ import annotations

JPEG_MODES = ("RGB", "L")  # plain JPEGs; CMYK/YCCK and the rest go through Pillow


def decode_on_device(blobs: list[bytes], size: int, device):
    """JPEG files -> (n, size, size, 3) uint8 tensor on device: decoded (nvjpeg on CUDA),
    EXIF-oriented, resized with antialiasing like the Pillow path."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    with torch.inference_mode():
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
        resized = [F.interpolate(im[None].float(), size=(size, size), mode="bicubic", antialias=True)[0]
                   for im in images]
        return torch.stack(resized).clamp_(0, 255).round_().to(torch.uint8).permute(0, 2, 3, 1)
