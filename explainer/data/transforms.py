"""Decode stored bytes into model inputs: RGB resize + normalisation (ImageNet or the classifier's own), and
segmentation maps.

Shards keep original encoded bytes (docs/method.md#data-shards), so every conversion to the model's resolution happens
here, in one place that training, evaluation and the benchmarks share.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import IO

import numpy as np
import torch
import torch.utils.data
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

VOID = 255  # segmentation label for "don't care" pixels (VOC boundary band)

# The most pixels (width x height) an image may declare before it is decoded: PIL's own default for
# Image.MAX_IMAGE_PIXELS (~0.25 GiB as 24-bit RGB). A few hundred KB of PNG can declare 12000 x 12000 and take 10 GB to
# decode. Raised with data.max_image_pixels / --max-image-pixels; None: no cap.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
_PIXEL_CAP: contextvars.ContextVar[int | None] = contextvars.ContextVar("pixel_cap", default=DEFAULT_MAX_IMAGE_PIXELS)
_CURRENT = -1  # "the cap of the current context" (`pixel_cap`)


class ImageTooLarge(ValueError):
    """An image that declares more pixels than the cap; refused from its header, before anything is decoded."""


@contextlib.contextmanager
def pixel_cap(max_pixels: int | None) -> Iterator[None]:
    """The cap that `open_image` and the decoders apply in this context when not given one (the shard writer)."""
    token = _PIXEL_CAP.set(max_pixels)
    try:
        yield
    finally:
        _PIXEL_CAP.reset(token)


def check_pixels(size: tuple[int, int], max_pixels: int | None = _CURRENT) -> None:
    """Raise ImageTooLarge when an image of `size` (W, H) has more pixels than the cap."""
    cap = _PIXEL_CAP.get() if max_pixels == _CURRENT else max_pixels
    if cap is not None and size[0] * size[1] > cap:
        raise ImageTooLarge(f"image is {size[0]} x {size[1]} = {size[0] * size[1]:,} pixels, more than the cap of "
                            f"{cap:,} (data.max_image_pixels, --max-image-pixels)")


def open_image(source: bytes | str | os.PathLike | IO[bytes], max_pixels: int | None = _CURRENT) -> Image.Image:
    """`Image.open` (reads the header only), then the pixel cap, so nothing over the cap is ever decoded; use it as
    `with open_image(...) as im:` like Image.open.

    PIL's own check (Image.MAX_IMAGE_PIXELS: a warning above it, an error above twice it) is lifted to our cap for
    this open when the cap is higher, so that raising the cap works; above the cap PIL's error is ours
    (ImageTooLarge). Not thread-safe (PIL's limit is process-wide); our decoders run one per process.
    """
    cap = _PIXEL_CAP.get() if max_pixels == _CURRENT else max_pixels
    pil_limit = Image.MAX_IMAGE_PIXELS
    lift = pil_limit is not None and (cap is None or cap > pil_limit)
    try:
        if lift:
            Image.MAX_IMAGE_PIXELS = cap
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # over our cap: refused just below
            im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{exc} (more than the cap of {cap:,} pixels: data.max_image_pixels, "
                            "--max-image-pixels)") from None
    finally:
        if lift:
            Image.MAX_IMAGE_PIXELS = pil_limit
    try:
        check_pixels(im.size, cap)
    except ImageTooLarge:
        im.close()
        raise
    return im


RESIZE_MODES = ("squash", "center_crop", "letterbox")  # data.resize: how an image becomes size x size
Box = tuple[float, float, float, float]  # (left, top, right, bottom)


def resize_boxes(width: int, height: int, size: int, mode: str) -> tuple[Box, tuple[int, int, int, int]]:
    """(the part of a width x height image that is shown, where it lands in the size x size model input).

    squash: the whole image on the whole input (aspect ratio lost; the paper presets). center_crop: the centred
    square of side min(width, height) on the whole input (the borders are not seen). letterbox: the whole image,
    aspect ratio kept, centred on the input; the rest is padding.
    """
    if mode == "squash":
        return (0.0, 0.0, float(width), float(height)), (0, 0, size, size)
    if mode == "center_crop":
        side = float(min(width, height))
        left, top = (width - side) / 2, (height - side) / 2
        return (left, top, left + side, top + side), (0, 0, size, size)
    if mode == "letterbox":
        scale = size / max(width, height)
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
        left, top = (size - w) // 2, (size - h) // 2
        return (0.0, 0.0, float(width), float(height)), (left, top, left + w, top + h)
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")


def fit_image(im: Image.Image, size: int, mode: str = "squash", fill: int | tuple[int, ...] = 0,
              resample: int = Image.BILINEAR) -> Image.Image:
    """A PIL image -> size x size by `mode` (resize_boxes); letterbox pads with `fill`."""
    src, dst = resize_boxes(im.size[0], im.size[1], size, mode)
    target = (dst[2] - dst[0], dst[3] - dst[1])
    if target == im.size and src == (0.0, 0.0, float(im.size[0]), float(im.size[1])):
        fitted = im
    else:
        fitted = im.resize(target, resample, box=src)
    if fitted.size == (size, size):
        return fitted
    canvas = Image.new(im.mode, (size, size), fill)
    canvas.paste(fitted, dst[:2])
    return canvas


def mean_fill(mean: Sequence[float] = IMAGENET_MEAN) -> tuple[int, int, int]:
    """The uint8 colour of the classifier's mean: letterbox padding that normalises to about 0 (a removed pixel)."""
    return tuple(int(round(255 * float(m))) for m in mean)  # type: ignore[return-value]


def decode_rgb(data: bytes, size: int, resize: str = "squash", fill: tuple[int, int, int] = (0, 0, 0), *,
               max_pixels: int | None = _CURRENT) -> np.ndarray:
    """Encoded image bytes -> uint8 [size, size, 3] (any PIL mode converted to RGB), by `resize` (resize_boxes;
    letterbox pads with `fill`).

    JPEGs at least twice the target size on both sides are decoded at a reduced DCT scale (PIL's draft mode: still at
    least `size` on both sides), which is several times faster than decoding every pixel and then shrinking. An image
    over the pixel cap (`open_image`) raises ImageTooLarge before decoding.
    """
    with open_image(data, max_pixels) as im:
        if im.format == "JPEG" and min(im.size) >= 2 * size:
            im.draft("RGB", (size, size))
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(fit_image(im, size, resize, fill), dtype=np.uint8)


def decode_seg(data: bytes, size: int, resize: str = "squash", *, max_pixels: int | None = _CURRENT) -> np.ndarray:
    """Class-index PNG bytes -> uint8 [size, size] with the stored indices (nearest resize, palette NOT applied);
    the geometry of decode_rgb, letterbox padding void."""
    with open_image(data, max_pixels) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"segmentation PNG must be single-channel (P or L), got mode {im.mode}")
        # mode P: the raw palette indices ARE the class indices; never convert through the palette
        if im.mode == "P":  # the indices as a plain 'L' image, so padding and pasting keep them
            im = Image.frombytes("L", im.size, im.tobytes())
        return np.asarray(fit_image(im, size, resize, VOID, Image.NEAREST), dtype=np.uint8)


def input_to_original(width: int, height: int, size: int, mode: str) -> tuple[tuple[int, int, int, int],
                                                                                tuple[int, int, int, int]]:
    """The inverse of resize_boxes, in whole pixels: (the part of the size x size input that shows the image, as
    (x0, y0, x1, y1); where it lands on the width x height image, as (left, top, width, height)). What
    mask_to_original and the pointing game (explainer/metrics.py) map model-input maps back with."""
    src, dst = resize_boxes(width, height, size, mode)
    left, top = round(src[0]), round(src[1])
    return dst, (left, top, round(src[2]) - left, round(src[3]) - top)


def mask_to_original(mask: np.ndarray, size: tuple[int, int], mode: str = "squash") -> Image.Image:
    """A [S, S] mask in [0, 1] of the model input -> 8-bit 'L' image on the original (W, H) image: the inverse of
    resize_boxes (bilinear); parts of the image the model did not see (center_crop borders) are 0."""
    s = mask.shape[-1]
    im = Image.fromarray(np.round(np.clip(mask, 0.0, 1.0) * 255).astype(np.uint8), mode="L")
    dst, (left, top, *shown_wh) = input_to_original(size[0], size[1], s, mode)
    if dst != (0, 0, s, s):
        im = im.crop(dst)
    shown = tuple(shown_wh)
    if im.size != shown:
        im = im.resize(shown, Image.BILINEAR)
    if shown == size:
        return im
    canvas = Image.new("L", size, 0)
    canvas.paste(im, (left, top))
    return canvas


def seg_to_binary(classes: np.ndarray) -> np.ndarray:
    """Class-index map -> {0 background, 1 any object, 255 void}."""
    out = (classes != 0).astype(np.uint8)
    out[classes == VOID] = VOID
    return out


@functools.lru_cache(maxsize=8)
def _affine(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift), float32 [3,1,1], such that (x / 255 - mean) / std = x * scale + shift."""
    m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return (1.0 / (255.0 * s)).reshape(3, 1, 1), (-m / s).reshape(3, 1, 1)


def _empty_batch(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, pin: bool = False) -> torch.Tensor:
    """A tensor to fill; in a DataLoader worker, allocated in shared memory (as torch's default_collate does), which
    saves copying every batch into shared memory when it is sent to the main process. `pin`: page-locked (main
    process, when batches go to a GPU)."""
    if torch.utils.data.get_worker_info() is not None:
        try:
            storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
            return torch.empty(0, dtype=dtype).set_(storage).view(shape)
        except (AttributeError, RuntimeError):  # private API: fall back to a plain tensor
            pass
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


def _check_images(images: np.ndarray | Sequence[np.ndarray]) -> tuple[int, int]:
    if len(images) == 0:
        raise ValueError("a batch needs at least one image")
    h, w = images[0].shape[:2]
    for i, image in enumerate(images):
        if image.shape != (h, w, 3) or image.dtype != np.uint8:
            raise ValueError(f"image {i}: expected uint8 {(h, w, 3)}, got {image.dtype} {image.shape}")
    return h, w


def stack_images(images: Sequence[np.ndarray]) -> torch.Tensor:
    """B uint8 arrays [H, W, 3] -> uint8 [B, H, W, 3] (in shared memory in a DataLoader worker).

    What workers send instead of the normalised batch: a quarter of the bytes, and fresh shared memory is costly to
    fill (page faults on tmpfs: ~24 ms for a float32 batch of 32 at 224 px, ~4 ms as uint8, against ~8 ms to
    normalise the uint8 batch in the main process).
    """
    h, w = _check_images(images)
    out = _empty_batch((len(images), h, w, 3), torch.uint8)
    view = out.numpy()
    for i, image in enumerate(images):
        view[i] = image
    return out


def normalize_batch(images: np.ndarray | Sequence[np.ndarray], *, pin: bool = False,
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 [B, H, W, 3] (or B arrays [H, W, 3]) -> float32 [B, 3, H, W] normalised: (x / 255 - mean) / std, with
    the classifier's mean/std (ImageNet's by default), so a zeroed (masked) pixel is the mean colour.

    Image by image into one preallocated batch, so each image is transposed, converted, scaled and shifted while it
    is in cache (about 3x faster than whole-batch tensor ops, which are memory-bound). numpy, not torch: torch's
    intra-op threads made these small ops 100x slower on a busy machine. `pin`: the result in page-locked memory.
    """
    h, w = _check_images(images)
    scale, shift = _affine(tuple(float(v) for v in mean), tuple(float(v) for v in std))
    out = _empty_batch((len(images), 3, h, w), pin=pin)
    view = out.numpy()
    for i, image in enumerate(images):
        np.multiply(image.transpose(2, 0, 1), scale, out=view[i])
        view[i] += shift
    return out


_DEVICE_CONSTANTS: dict[tuple[torch.device, tuple[float, ...], tuple[float, ...]],
                        tuple[torch.Tensor, torch.Tensor]] = {}


def normalize_on_device(images: torch.Tensor, *, channels_last: bool = False, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 [B, H, W, 3] (already on the model's device) -> float32 [B, 3, H, W] normalised with mean/std (the
    classifier's; ImageNet's by default), with the arithmetic of normalize_batch (x * scale, then + shift, in
    float32), so both give the same values.

    For batches sent to a GPU as uint8 (a quarter of the bytes of float32): the permuted NHWC batch IS channels_last,
    so `channels_last=True` costs no copy; otherwise the result is made contiguous NCHW.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [B, H, W, 3] batch, got {images.dtype} {tuple(images.shape)}")
    key = (images.device, tuple(float(v) for v in mean), tuple(float(v) for v in std))
    if key not in _DEVICE_CONSTANTS:
        scale, shift = _affine(key[1], key[2])
        _DEVICE_CONSTANTS[key] = (torch.from_numpy(scale).view(1, 3, 1, 1).to(images.device),
                                  torch.from_numpy(shift).view(1, 3, 1, 1).to(images.device))
    scale, shift = _DEVICE_CONSTANTS[key]
    x = images.permute(0, 3, 1, 2).to(torch.float32).mul_(scale).add_(shift)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def denormalize(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Inverse of the normalisation, for display: [..., 3, H, W] -> values in about [0, 1]."""
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * std + mean
