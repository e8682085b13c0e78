"""Image decoding and preprocessing shared by training and serving (PIL + numpy, no torch).

Training, evaluation, threshold calibration and the classifier service all call
prepare() and normalise() from here, so served predictions follow the card's contract
exactly:

    image = decode(raw_bytes, limits)                       # checked, first frame, EXIF-rotated
    pixels = prepare(image, size=64, colour="grey", background=(0, 0, 0))   # uint8 [64, 64, 3]
    batch = normalise(np.stack([pixels]), mean, std)        # float32 [N, 3, 64, 64]

Preprocessing contract (the card's contract.preprocessing repeats it):
  - first frame only (GIF, animated WebP), EXIF orientation applied;
  - alpha (RGBA, LA, palette with transparency) composited onto `background`;
  - colour "grey": ITU-R 601-2 luma (PIL's "L"), copied into 3 channels;
    colour "rgb": RGB order (greyscale copied into 3 channels);
  - 16-bit greyscale scaled to 8 bits;
  - resized with PIL's bilinear filter (antialiased when shrinking) so that its longer side is
    `size`, aspect ratio kept, then padded to size x size with `background` (centred);
  - x = (pixel / 255 - mean) / std per channel, NCHW float32.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half an image
FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "GIF"}
RESIZE = Image.Resampling.BILINEAR


class ImageError(ValueError):
    """A file that cannot be used as an image; `code` names the problem, `status` the HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000   # width x height; larger is treated as a decompression bomb
    max_side: int = 20_000


def decode(data: bytes, limits: Limits = Limits()) -> Image.Image:
    """Bytes -> a fully loaded PIL image (first frame), or ImageError saying why not."""
    return load(open_image(data, limits))


def open_image(data: bytes, limits: Limits = Limits()) -> Image.Image:
    """Bytes -> an opened image whose header passed every check; its pixels are not decoded yet
    (so a request's total size can be checked before any decoding work)."""
    if not data:
        raise ImageError("empty_file", "the file is empty")
    if len(data) > limits.max_file_bytes:
        raise ImageError("file_too_large", f"the file has {len(data)} bytes, over the limit of "
                         f"{limits.max_file_bytes} (MAX_IMAGE_BYTES)", 413)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=sorted(FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("decompression_bomb", "the image declares far more pixels than it can hold "
                         f"(over {limits.max_pixels} allowed, MAX_IMAGE_PIXELS)", 413) from None
    except UnidentifiedImageError:
        raise ImageError("not_an_image", f"not a supported image; send one of {', '.join(sorted(FORMATS))}") from None
    except Exception as exc:  # noqa: BLE001 - PIL's header parsers raise many kinds (OSError, ValueError,
        # struct.error ...) for a malformed header: a BMP with header size 99 or bit depth 7, a PNG
        # whose zTXt or iCCP chunk inflates past PIL's text limit. Each is the client's file.
        raise ImageError("corrupt_image", f"the file's header is malformed ({type(exc).__name__}: "
                         f"{str(exc)[:200]})") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError("invalid_image", f"the image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels or max(width, height) > limits.max_side:
        raise ImageError("decompression_bomb", f"the image is {width}x{height} = {width * height} pixels, "
                         f"over the limit of {limits.max_pixels} pixels or {limits.max_side} per side "
                         "(MAX_IMAGE_PIXELS)", 413)
    return image


def load(image: Image.Image) -> Image.Image:
    """Decode an opened image's first frame, EXIF orientation applied."""
    try:
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 - as above: whatever a broken file makes PIL raise
        raise ImageError("corrupt_image", f"the {image.format} file is truncated or corrupt "
                         f"({str(exc)[:200]})") from None
    return image


def _flatten(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode -> "RGB" or "L", alpha composited onto the background colour."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit or float greyscale
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(np.rint(array * 255.0 / top), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if image.mode in ("L", "RGB"):
        return image
    if image.mode == "1":
        return image.convert("L")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV ...


def prepare(image: Image.Image, size: int, colour: str, background: tuple[int, int, int]) -> np.ndarray:
    """A decoded image -> uint8 [size, size, 3] following the contract in the module docstring."""
    image = _flatten(image, tuple(background))
    image = image.convert("L") if colour == "grey" else image.convert("RGB")
    fill = int(round(0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2])) \
        if image.mode == "L" else tuple(background)
    width, height = image.size
    if width != height:  # pad, don't crop: the whole object stays in view
        # resize first, then pad: padding a 20000x1 strip to 20000x20000 before shrinking it would
        # cost a square's worth of pixels; this way the cost follows the pixels the file holds
        side = max(width, height)
        inner = (max(1, round(width * size / side)), max(1, round(height * size / side)))
        if inner != image.size:
            image = image.resize(inner, RESIZE)
        square = Image.new(image.mode, (size, size), fill)
        square.paste(image, ((size - inner[0]) // 2, (size - inner[1]) // 2))
        image = square
    elif width != size:
        image = image.resize((size, size), RESIZE)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array)


def rgb_array(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """A decoded image at its own size -> uint8 [H, W, 3] RGB (alpha composited onto white)."""
    return np.ascontiguousarray(np.asarray(_flatten(image, background).convert("RGB"), dtype=np.uint8))


def normalise(pixels: np.ndarray, mean, std) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W]: (pixel / 255 - mean) / std."""
    x = pixels.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def preprocess(files: list[bytes], preprocessing: dict, limits: Limits = Limits()) -> np.ndarray:
    """Image files -> the model's float32 input batch, by a card's contract.preprocessing (offline use;
    the service decodes file by file to name a bad one)."""
    pixels = np.stack([prepare(decode(data, limits), **contract_args(preprocessing)) for data in files])
    return normalise(pixels, preprocessing["mean"], preprocessing["std"])


def contract_args(preprocessing: dict) -> dict:
    """prepare()'s keyword arguments from a card's contract.preprocessing."""
    return {"size": int(preprocessing["input_size"]), "colour": preprocessing["colour"],
            "background": tuple(preprocessing["background"])}


def _pil(array: np.ndarray):
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    _pil(array).save(buffer, format="PNG")
    return buffer.getvalue()


def gif_bytes(frames: np.ndarray, gif_frame_ms: int = 100) -> bytes:
    """An animated GIF that plays the frames forward and back, looping."""
    images = [_pil(f) for f in frames] + [_pil(f) for f in frames[-2:0:-1]]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=gif_frame_ms, loop=0)
    return buffer.getvalue()
