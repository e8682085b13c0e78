"""Face geometry shared by training and serving (numpy only, no torch): what goes into and
comes out of the three face networks, and alignment as dlib does it.

    net_input, size = detector_input(rgb)                      # [1, 3, 512, 512], face-api's padding
    found = faces_found(boxes, scores, size)                   # [(x0, y0, x1, y1, score)], biggest first
    face_input, crop = landmark_input(rgb, (x, y, w, h))       # [1, 3, 112, 112]
    points = landmark_points(relative, crop)                   # [68, 2] in pixels
    chip = align(rgb, points)                                  # uint8 [150, 150, 3], the descriptor's input

The detector and landmark steps reproduce face-api's own JavaScript (its padding, tfjs's
bilinear resize without half-pixel centres, its NMS); training/faces checks each against
face-api's recorded outputs. Alignment follows dlib's get_face_chip_details(shape, 150, 0.25)
and extract_image_chip.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

DETECTOR_SIZE = 512  # the detector's input side
LANDMARK_SIZE = 112  # the landmark net's input side

CHIP_SIZE = 150
CHIP_PADDING = 0.25

# dlib's mean face (interpolation.h): x, y of landmarks 17..67 in a unit square.
_MEAN_X = [0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
           0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
           0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
           0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
           0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
           0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
           0.553364, 0.490127, 0.42689]
_MEAN_Y = [0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
           0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
           0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
           0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
           0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
           0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
           0.784792, 0.824182, 0.831803, 0.824182]
# dlib fits the nose, eyes and outer/upper lips: not the jaw (0-16), which moves with the
# head's pose, nor the eyebrows (17-26) and lower lip (55-59, 65-67), which move with expression.
FITTED = [i for i in range(17, 68) if not (17 <= i <= 26 or 55 <= i <= 59 or 65 <= i <= 67)]
_MEAN_FACE = np.array([[_MEAN_X[i - 17], _MEAN_Y[i - 17]] for i in FITTED])


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 rotation + uniform scale + translation mapping src points onto dst, least squares
    (Umeyama 1991, what dlib's find_similarity_transform computes)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mean_src, mean_dst = src.mean(0), dst.mean(0)
    a, b = src - mean_src, dst - mean_dst
    variance = (a ** 2).sum() / len(src)
    covariance = b.T @ a / len(src)
    u, d, vt = np.linalg.svd(covariance)
    s = np.eye(2)
    if np.linalg.det(covariance) < 0:
        s[1, 1] = -1
    rotation = u @ s @ vt
    scale = np.trace(np.diag(d) @ s) / variance
    m = scale * rotation
    return np.hstack([m, (mean_dst - m @ mean_src)[:, None]])


def chip_transform(points68: np.ndarray, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> np.ndarray:
    """2x3 affine mapping chip pixel (x, y) -> image point, as dlib's chip_details and
    get_mapping_to_chip define it (a square rect of size*scale, rotated about its centre,
    whose corners land on the chip's corner pixels)."""
    chip_points = (padding + _MEAN_FACE) / (2 * padding + 1) * size
    tform = similarity_transform(chip_points, np.asarray(points68, np.float64)[FITTED])
    m = tform[:, :2]
    angle = np.arctan2(m[1, 0], m[0, 0])
    scale = np.hypot(m[0, 0], m[1, 0])
    centre = m @ np.array([size / 2, size / 2]) + tform[:, 2]
    half = (size * scale - 1) / 2  # dlib's centered_drect: the rect spans width - 1
    cos, sin = np.cos(angle), np.sin(angle)
    rotate = np.array([[cos, -sin], [sin, cos]])
    # chip corners (0,0), (size-1, 0), (size-1, size-1) -> the rotated rect's tl, tr, br
    image_corners = [centre + rotate @ np.array(c) for c in ([-half, -half], [half, -half], [half, half])]
    chip_corners = np.array([[0, 0], [size - 1, 0], [size - 1, size - 1]], np.float64)
    a = np.hstack([chip_corners, np.ones((3, 1))])
    return np.linalg.solve(a, np.array(image_corners)).T


def align(rgb: np.ndarray, points68: np.ndarray, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> np.ndarray:
    """uint8 [H, W, 3] image and its 68 landmarks (x, y pixels) -> uint8 [size, size, 3] chip."""
    transform = chip_transform(points68, size, padding)
    image = np.asarray(rgb)
    # dlib samples from the pyramid level where the face is still at least the chip's size
    # (its loop: halve the chip's rect until one more halving would make it fit).
    width = size * float(np.hypot(transform[0, 0], transform[1, 0])) - 1
    levels = 0
    while (width / 2 ** (levels + 1)) ** 2 > size * size:
        levels += 1
    if levels:
        # Only the chip's surroundings go through the pyramid (a 2560-pixel photo took 240 ms
        # whole). The crop starts on a multiple of 2**levels and keeps a margin for the filter,
        # so every pyramid pixel used is the one the whole photo would give.
        corners = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]]) @ transform.T
        step, margin = 2 ** levels, 4 * 2 ** levels + 4
        x0, y0 = (max(0, int(np.floor((corners[:, i].min() - margin) / step)) * step) for i in (0, 1))
        x1, y1 = (int(np.ceil(corners[:, i].max() + margin)) for i in (0, 1))
        image = image[y0:max(y0, y1), x0:max(x0, x1)]
        transform = transform - np.array([[0, 0, x0], [0, 0, y0]])
    for _ in range(levels):
        if min(image.shape[:2]) < 8:
            break
        image = pyramid_down(image)
        # dlib's point_down: p / 2 - (1.25, 0.75)
        transform = np.vstack([transform[0] / 2 - [0, 0, 1.25], transform[1] / 2 - [0, 0, 0.75]])
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    sx = transform[0, 0] * xs + transform[0, 1] * ys + transform[0, 2]
    sy = transform[1, 0] * xs + transform[1, 1] * ys + transform[1, 2]
    return bilinear(image.astype(np.float32), sx, sy)


def pyramid_down(image: np.ndarray) -> np.ndarray:
    """dlib's pyramid_down<2>: a [1 4 6 4 1] filter each way, every second pixel, truncated;
    output pixel j is centred on input 2j + 2, and there are (n - 3) // 2 of them."""
    x = np.asarray(image, np.int64)
    def down(a, axis):
        n = (a.shape[axis] - 3) // 2
        take = lambda k: np.take(a, 2 * np.arange(n) + k, axis=axis)  # noqa: E731
        return take(0) + 4 * take(1) + 6 * take(2) + 4 * take(3) + take(4)
    return (down(down(x, 1), 0) // 256).astype(np.uint8)


def bilinear(image: np.ndarray, sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """Sample image at (sx, sy); points outside the image are black, as in dlib."""
    h, w = image.shape[:2]
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    inside = (x0 >= 0) & (y0 >= 0) & (x0 + 1 < w) & (y0 + 1 < h)
    x0c, y0c = np.clip(x0, 0, w - 2), np.clip(y0, 0, h - 2)
    top = image[y0c, x0c] * (1 - fx) + image[y0c, x0c + 1] * fx
    bottom = image[y0c + 1, x0c] * (1 - fx) + image[y0c + 1, x0c + 1] * fx
    out = top * (1 - fy) + bottom * fy
    out[~inside] = 0
    return np.clip(out, 0, 255).astype(np.uint8)  # truncated, as dlib assigns to its pixels


# --- the detector (face-api's SsdMobilenetv1) -----------------------------------------------


class Size(NamedTuple):
    """The photo's size, all postprocess() needs to map boxes back to its pixels."""

    width: int
    height: int


def detector_input(rgb: np.ndarray) -> tuple[np.ndarray, Size]:
    """face-api's NetInput.toBatchTensor(512, isCenterInputs=false) on an RGB uint8 HxWx3 image.

    Pads the short side with zeros at the bottom or right (not centred, unlike the landmark net), then
    resizes the square to 512x512. Returns the net input [1, 3, 512, 512] float32 and the photo's size.
    """
    h, w = rgb.shape[:2]
    side = max(h, w)
    image = resize_bilinear(rgb, DETECTOR_SIZE, pad=((0, side - h), (0, side - w)))
    return image.transpose(2, 0, 1)[None].copy(), Size(w, h)


def resize_bilinear(img: np.ndarray, size: int, pad=((0, 0), (0, 0))) -> np.ndarray:
    """tf.image.resizeBilinear(alignCorners=false, halfPixelCenters=false), as tfjs' CPU kernel computes it:
    output pixel i samples input position i * in / out (no half-pixel offset), in float64, stored as float32.

    `pad` ((top, bottom), (left, right)) resizes the image as if zero-padded that much first, without
    making the padded image: only the size x size samples are read, so a 20000x1 photo costs its own
    pixels, not a 20000x20000 square's."""
    (top, bottom), (left, right) = pad

    def taps(n, before, after):  # source rows (or columns) of each output one, in the unpadded image
        n_in = n + before + after
        src = np.arange(size) * (n_in / size)
        lo = np.floor(src).astype(int)
        hi = np.minimum(np.ceil(src).astype(int), n_in - 1)
        return lo - before, hi - before, src - lo

    def corners(rows, c0, c1):  # img[rows][:, c0] and [:, c1] as float64, zero where a tap is in the padding
        picked = img[np.clip(rows, 0, img.shape[0] - 1)]  # the rows once, as uint8, for both column taps
        out = []
        for cols in (c0, c1):
            values = picked[:, np.clip(cols, 0, img.shape[1] - 1)].astype(np.float64)
            values[(rows < 0) | (rows >= img.shape[0])] = 0
            values[:, (cols < 0) | (cols >= img.shape[1])] = 0
            out.append(values)
        return out

    r0, r1, fr = taps(img.shape[0], top, bottom)
    c0, c1, fc = taps(img.shape[1], left, right)
    fc = fc[None, :, None]
    (a, b), (c, d) = corners(r0, c0, c1), corners(r1, c0, c1)
    # tfjs's order of operations, in place (no temporaries): top = a + (b - a) * fc, bottom the same
    # with c and d, out = top + (bottom - top) * fr
    b -= a
    b *= fc
    b += a
    d -= c
    d *= fc
    d += c
    d -= b
    d *= fr[:, None, None]
    d += b
    return d.astype(np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box a [4] with boxes b [K, 4], like face-api's IOU (0 if either box is empty)."""
    a0, a1 = np.minimum(a[:2], a[2:]), np.maximum(a[:2], a[2:])
    b0, b1 = np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])
    area_a, area_b = np.prod(a1 - a0), np.prod(b1 - b0, axis=1)
    inter = np.prod(np.maximum(np.minimum(a1, b1) - np.maximum(a0, b0), 0), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = inter / (area_a + area_b - inter)
    return np.where((area_a <= 0) | (area_b <= 0), 0.0, out)


def detections(boxes: np.ndarray, scores: np.ndarray, size: Size, min_confidence: float = 0.5,
                iou: float = 0.5, max_results: int = 100) -> list[tuple[float, float, float, float, float]]:
    """One image's net outputs (boxes [A, 4], scores [A]) -> [(x0, y0, x1, y1, score)] in photo pixels.

    face-api's locateFaces: greedy NMS (ssdMobilenetv1/nonMaxSuppression: scores > min_confidence, best
    first, drop a box whose IoU with a kept one is > iou), then clip to the 512 square's 0..1
    and scale by 512 / the resized photo's side in the square, times the photo's size. Like face-api,
    the far edges are not clipped to the photo: a box may reach into the padding, past width or height.
    """
    boxes, scores = boxes.astype(np.float64), scores.astype(np.float64)  # JS numbers are doubles
    candidates = np.flatnonzero(scores > min_confidence)
    candidates = candidates[np.argsort(-scores[candidates], kind="stable")]  # JS sort is stable
    keep: list[int] = []
    for i in candidates:
        if len(keep) >= min(max_results, len(boxes)):
            break
        if not keep or box_iou(boxes[i], boxes[keep]).max() <= iou:
            keep.append(int(i))

    # computeReshapedDimensions: the photo's size in the 512 square, rounded to whole pixels (at
    # least one: a 20000x1 strip's width rounds to 0, where face-api divides by zero)
    scale = DETECTOR_SIZE / max(size.width, size.height)
    pad_x = DETECTOR_SIZE / max(1, round_half_up(size.width * scale))
    pad_y = DETECTOR_SIZE / max(1, round_half_up(size.height * scale))
    faces = []
    for i in keep:
        x0, y0, x1, y1 = boxes[i]
        left, top = max(0.0, x0) * pad_x * size.width, max(0.0, y0) * pad_y * size.height
        right, bottom = min(1.0, x1) * pad_x * size.width, min(1.0, y1) * pad_y * size.height
        faces.append((left, top, right, bottom, float(scores[i])))
    return faces


def faces_found(boxes: np.ndarray, scores: np.ndarray, size: Size, min_confidence: float = 0.5,
                max_faces: int | None = None) -> list[tuple[float, float, float, float, float]]:
    """What the pipeline uses of detections(): boxes clipped to the photo (face-api lets a box
    reach into its padding), biggest first (the shorter side), at most max_faces."""
    found = [(max(0.0, x0), max(0.0, y0), min(float(size.width), x1), min(float(size.height), y1), score)
             for x0, y0, x1, y1, score in detections(boxes, scores, size, min_confidence)]
    return sorted(found, key=lambda f: -min(f[2] - f[0], f[3] - f[1]))[:max_faces]


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))  # JS Math.round


# --- the landmark net (face-api's FaceLandmark68Net) ----------------------------------------


class Crop(NamedTuple):
    """Where crop() took the face from: the clipped integer box and the square side it was padded to."""

    x: int
    y: int
    width: int
    height: int
    side: int  # max(width, height): the 112x112 input spans side x side crop pixels


def landmark_input(rgb: np.ndarray, box) -> tuple[np.ndarray, Crop]:
    """face-api's extractFaceTensors + NetInput.toBatchTensor(112, centered) on an RGB uint8 HxWx3 image.

    box = (x, y, width, height) in pixels, may be fractional or reach outside the image.
    Returns the net input [1, 3, 112, 112] float32 and what to_image_points() needs to undo it.
    """
    img_h, img_w = rgb.shape[:2]
    x, y, w, h = box
    # Box.clipAtImageBorders, then Box.floor (of x, y, width and height each)
    x0, y0 = max(x, 0), max(y, 0)
    w, h = min(x + w - x0, img_w - x0), min(y + h - y0, img_h - y0)
    x0, y0, w, h = (int(math.floor(v)) for v in (x0, y0, w, h))
    if w <= 0 or h <= 0:
        raise ValueError(f"box {box} is outside the {img_w}x{img_h} image")
    face = rgb[y0 : y0 + h, x0 : x0 + w]

    # ops/padToSquare(centered): zeros, Math.round(diff / 2) after the face, the rest before it
    side, diff = max(w, h), abs(w - h)
    after = int(math.floor(diff * 0.5 + 0.5))  # JS Math.round rounds halves up
    pad = (diff - after, after)
    face = resize_bilinear(face, LANDMARK_SIZE, pad=(pad, (0, 0)) if h < w else ((0, 0), pad))
    return face.transpose(2, 0, 1)[None].copy(), Crop(x0, y0, w, h, side)


def landmark_points(landmarks_rel: np.ndarray, t: Crop) -> np.ndarray:
    """[68, 2] net output (0..1 of the 112 input) -> [68, 2] pixel coordinates in the original image.

    Same arithmetic as face-api's FaceLandmark68NetBase.postProcess + shiftBy: scale to the square side,
    remove half the padding, add the crop's corner. (face-api shifts by the unclipped detection box, which
    is wrong for boxes that cross the top/left border; the clipped crop corner is used here.)
    """
    pad = np.array([t.side - t.width, t.side - t.height]) / 2
    return landmarks_rel.astype(np.float64) * t.side - pad + np.array([t.x, t.y])


# --- the animal check (an ImageNet classifier on the face's surroundings) ---------------------

ANIMAL_SIZE = 224   # the ImageNet classifier's input side
ANIMAL_GROW = 1.6   # the square it sees: 1.6 times the box's longer side, so ears and snout are in view
ANIMAL_MEAN, ANIMAL_STD = 0.498, 0.502  # EfficientNet-Lite's normalisation, every channel


def animal_input(rgb: np.ndarray, boxes) -> np.ndarray:
    """uint8 [H, W, 3] photo and face boxes (x0, y0, x1, y1) -> float32 [N, 3, 224, 224]: a square
    ANIMAL_GROW times each box's longer side around its centre (black past the photo's edges),
    resized with PIL's antialiased bilinear filter, normalised."""
    from PIL import Image

    photo = Image.fromarray(np.ascontiguousarray(rgb))
    return animal_normalise(np.stack([animal_pixels(photo, box) for box in boxes]))


def animal_pixels(photo, box) -> np.ndarray:
    """uint8 [224, 224, 3]: the square animal_input() sees around one box (photo: PIL or array)."""
    from PIL import Image

    if not isinstance(photo, Image.Image):
        photo = Image.fromarray(np.ascontiguousarray(photo))
    x0, y0, x1, y1 = box
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0, 1.0) * ANIMAL_GROW / 2
    square = photo.crop(tuple(int(round(v)) for v in (cx - half, cy - half, cx + half, cy + half)))
    return np.asarray(square.resize((ANIMAL_SIZE, ANIMAL_SIZE), Image.Resampling.BILINEAR), np.uint8)


def animal_normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 [N, 224, 224, 3] -> the animal check's float32 [N, 3, 224, 224]."""
    x = (pixels.astype(np.float32) / 255 - ANIMAL_MEAN) / ANIMAL_STD
    return x.transpose(0, 3, 1, 2).astype(np.float32)
