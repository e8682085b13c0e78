"""services/contracts/imaging.py: decoding limits and the preprocessing contract (no server, no torch)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from classifier_helpers import encode, varied_files
from services.contracts import imaging

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

    code = ("import sys, services.classifier.service, services.contracts.imaging; "
            "bad = [m for m in ('torch', 'torchvision', 'training') if m in sys.modules]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def bmp(header_size: int = 40, bit_depth: int = 24, compression: int = 0) -> bytes:
    """A 4x4 BMP with the given DIB header fields (the defaults make a valid file)."""
    import struct

    pixels = b"\x80" * (4 * 4 * 3)
    dib = struct.pack("<IiiHHIIiiII", header_size, 4, 4, 1, bit_depth, compression, len(pixels), 2835, 2835, 0, 0)
    dib += b"\0" * max(0, header_size - len(dib))
    head = struct.pack("<2sIHHI", b"BM", 14 + len(dib) + len(pixels), 0, 0, 14 + len(dib))
    return head + dib + pixels


def png_with_chunk(kind: bytes, data: bytes) -> bytes:
    """A valid PNG with one more chunk right after IHDR."""
    import struct
    import zlib

    png = encode(Image.new("L", (4, 4), 9), "PNG")
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return png[:33] + chunk + png[33:]  # 8-byte signature + 25-byte IHDR chunk


def inflating(size: int) -> bytes:
    import zlib

    return zlib.compress(b"a" * size, 9)


@pytest.mark.parametrize("data", [
    bmp(header_size=99), bmp(bit_depth=7), bmp(compression=9),
    png_with_chunk(b"zTXt", b"Comment\0\0" + inflating(2_000_000)),
    png_with_chunk(b"iCCP", b"icc\0\0" + inflating(2_000_000)),
], ids=["bmp-header-99", "bmp-depth-7", "bmp-compression-9", "png-ztxt-2mb", "png-iccp-2mb"])
def test_malformed_headers_are_a_clear_error_not_a_crash(data):
    """Found by an outside probe: PIL raised errors that decode() did not catch (a 500)."""
    assert imaging.prepare(imaging.decode(bmp()), **GREY).shape == (32, 32, 3)  # the fixture itself is valid
    with pytest.raises(imaging.ImageError) as error:
        imaging.prepare(imaging.decode(data), **GREY)
    assert error.value.status == 400 and error.value.code == "corrupt_image"
