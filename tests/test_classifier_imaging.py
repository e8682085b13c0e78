"""services/imaging.py: decoding limits and the preprocessing contract (no server, no torch)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from classifier_helpers import encode, varied_files
from services import imaging

GREY = {"size": 32, "colour": "grey", "background": (0, 0, 0)}


def test_every_format_and_mode_decodes_to_the_contract_shape():
    for name, data in varied_files().items():
        pixels = imaging.prepare(imaging.decode(data), **GREY)
        assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8, name
        assert (pixels[:, :, 0] == pixels[:, :, 2]).all(), f"{name}: grey contract means equal channels"


def test_alpha_is_composited_onto_the_background_and_padding_keeps_the_aspect():
    clear = Image.new("RGBA", (20, 10), (255, 255, 255, 0))
    assert imaging.prepare(clear, 16, "rgb", (0, 0, 0)).max() == 0
    assert imaging.prepare(clear, 16, "rgb", (255, 255, 255)).min() == 255
    wide = Image.new("L", (40, 20), 255)  # white bar: padded top and bottom with black, not stretched
    pixels = imaging.prepare(wide, 40, "grey", (0, 0, 0))
    assert pixels[0].max() == 0 and pixels[-1].max() == 0 and pixels[20].min() == 255


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    half = Image.fromarray(np.full((8, 8), 32768, np.uint16))
    assert abs(int(imaging.prepare(half, 8, "grey", (0, 0, 0))[0, 0, 0]) - 128) <= 1


def test_normalise_follows_mean_and_std():
    x = imaging.normalise(np.full((1, 2, 2, 3), 255, np.uint8), [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    assert x.shape == (1, 3, 2, 2) and x.dtype == np.float32 and np.allclose(x, 1.0)


def test_gif_gives_its_first_frame():
    frames = [Image.new("L", (8, 8), 0).convert("P"), Image.new("L", (8, 8), 255).convert("P")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    assert imaging.prepare(imaging.decode(buffer.getvalue()), **GREY).max() == 0


BOMB = encode(Image.new("1", (7000, 7000)), "PNG")  # a few kB that decode to 49 megapixels


@pytest.mark.parametrize("data, limits, code", [
    (b"", imaging.Limits(), "empty_file"),
    (b"hello, I am text", imaging.Limits(), "not_an_image"),
    (encode(Image.new("RGB", (64, 64), "red"), "TIFF"), imaging.Limits(), "not_an_image"),  # not on the list
    (encode(Image.new("RGB", (64, 64), "red"), "PNG")[:60], imaging.Limits(), "corrupt_image"),
    (encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")[:900],
     imaging.Limits(), "corrupt_image"),
    (BOMB, imaging.Limits(max_pixels=10_000_000), "decompression_bomb"),
    (encode(Image.new("RGB", (64, 64)), "PNG"), imaging.Limits(max_file_bytes=50), "file_too_large"),
])
def test_bad_files_are_named(data, limits, code):
    with pytest.raises(imaging.ImageError) as caught:
        imaging.decode(data, limits)
    assert caught.value.code == code and caught.value.status in (400, 413)


def test_the_classifier_service_imports_no_torch():
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys, services.classifier.service, services.imaging; "
            "bad = [m for m in ('torch', 'torchvision', 'training') if m in sys.modules]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
