"""Turning an image into the normalized 448x448 tiles InternVL's vision stage takes.

A port of OpenGVLab InternVL's `load_image` / `dynamic_preprocess` / `build_transform` (the
InternVL-Chat-V1-5 / InternVL2 README and `internvl_chat/internvl/train/dataset.py`), in Pillow and
NumPy only, so that the edge runtime needs no torchvision:

- dynamic mode (V1-5, InternVL2, 2.5, 3): choose a grid of `cols x rows` tiles whose aspect ratio is
  closest to the image's, resize the image to `(448*cols, 448*rows)` with bicubic, cut row-major
  448x448 crops and, when there is more than one crop, append the whole image resized to 448x448;
- squash mode (InternVL-Chat-V1-2, `dynamic_image_size=False`): one bicubic 448x448 resize;
- then torchvision's `ToTensor` (uint8 / 255 in float32) and `Normalize` with ImageNet mean/std.

The output is bit-identical to the original pipeline, 16-bit grayscale excepted (see `to_rgb`);
tests compare it pixel for pixel with transformers' GotOcr2 PIL processor.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 448
# Pillow's own decompression-bomb warning threshold (about 89.5 megapixels, ~268 MB as RGB).
MAX_PIXELS = 89_478_485

ImageSource = str | os.PathLike | bytes | bytearray


class ImageLoadError(ValueError):
    """An image file that cannot be used: unreadable, corrupt, not an image, or too large."""


# ---------------------------------------------------------------- loading and colour modes

def _name(source: ImageSource) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return os.fspath(source)


def read_image_size(source: ImageSource, *, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """`(width, height)` from the file header, without decoding pixels."""
    with _open(source, max_pixels) as image:
        return image.size


def load_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode a file path or encoded bytes into an RGB image (frame 0 of animations).

    Like the original, the EXIF orientation tag is not applied: the model was trained on pixels as
    stored.
    """
    with _open(source, max_pixels) as image:
        try:
            image.load()
            rgb = to_rgb(image)
            # Leaving the `with` closes `image`; a closed Pillow image cannot be used any more.
            return image.copy() if rgb is image else rgb
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ImageLoadError(f"cannot decode image {_name(source)}: {_one_line(exc)}") from None


def _open(source: ImageSource, max_pixels: int) -> Image.Image:
    name = _name(source)
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with warnings.catch_warnings():
            # We apply our own limit below; Pillow's global one must not turn into a warning here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp)
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {name}") from None
    except IsADirectoryError:
        raise ImageLoadError(f"image path is a directory: {name}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"not a readable image file: {name}") from None
    except Image.DecompressionBombError:
        raise ImageLoadError(f"image too large (decompression bomb guard): {name}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageLoadError(f"cannot open image {name}: {_one_line(exc)}") from None
    width, height = image.size
    if width < 1 or height < 1:
        image.close()
        raise ImageLoadError(f"image has an empty size {width}x{height}: {name}")
    if width * height > max_pixels:
        image.close()
        raise ImageLoadError(
            f"image too large: {width}x{height} is over the {max_pixels}-pixel limit: {name}")
    return image


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the original's `image.convert('RGB')`: alpha is dropped (not composited on white).

    One deliberate difference: 16-bit grayscale ("I;16*", "I") keeps its high byte, as Pillow itself
    does when it opens a 16-bit RGB PNG. Pillow's `convert('RGB')` clips those values at 255, which
    turns almost every such image into plain white.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.int64)
        high_byte = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(high_byte, mode="L").convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------- grid choice

def target_grids(min_num: int = 1, max_num: int = 12) -> list[tuple[int, int]]:
    """Candidate `(cols, rows)` grids, in the exact order the original iterates them.

    The original builds a Python *set* and sorts it by tile count; `sorted` is stable, so grids with
    the same tile count keep the set's iteration order, and that order decides exact ties in
    `find_closest_aspect_ratio` (e.g. min_num=max_num=4 with a 5x2 image: (4, 1) vs (2, 2)).
    CPython's set order for small-int tuples is deterministic (int hashes are not randomized, tuple
    hashing is unchanged since 3.8) and depends only on the hashes and on the insertion sequence, so
    building the set with the very same generator reproduces it. Do not "simplify" this into nested
    loops over a list: transformers' GotOcr2 does that and picks differently at such ties (the
    tests pin both orders).
    """
    ratios = set(
        (i, j) for n in range(min_num, max_num + 1)
        for i in range(1, n + 1) for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num)
    return sorted(ratios, key=lambda x: x[0] * x[1])


def find_closest_aspect_ratio(aspect_ratio: float, target_ratios: list[tuple[int, int]],
                              width: int, height: int, image_size: int) -> tuple[int, int]:
    """The grid whose cols/rows is closest to `aspect_ratio`; on an exact tie, the later grid (more
    tiles) wins while the image's area exceeds half the area those tiles cover."""
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def choose_grid(width: int, height: int, *, min_num: int = 1, max_num: int = 12,
                image_size: int = IMAGE_SIZE) -> tuple[int, int]:
    """`(cols, rows)` of the dynamic tiling of a `width x height` image."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 1 <= min_num <= max_num:
        raise ValueError(f"need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")
    return find_closest_aspect_ratio(width / height, target_grids(min_num, max_num),
                                     width, height, image_size)


def count_tiles(width: int, height: int, *, dynamic_image_size: bool = True,
                use_thumbnail: bool = True, min_num: int = 1, max_num: int = 12,
                image_size: int = IMAGE_SIZE) -> int:
    """Number of tiles `image_to_tiles` returns for a `width x height` image (no pixels needed)."""
    if not dynamic_image_size:
        return 1
    cols, rows = choose_grid(width, height, min_num=min_num, max_num=max_num, image_size=image_size)
    blocks = cols * rows
    return blocks + 1 if use_thumbnail and blocks != 1 else blocks


# ---------------------------------------------------------------- tiling and normalization

def dynamic_preprocess(image: Image.Image, min_num: int = 1, max_num: int = 12,
                       image_size: int = IMAGE_SIZE,
                       use_thumbnail: bool = False) -> list[Image.Image]:
    """The original's PIL-level tiling of an RGB image: row-major crops of the grid-resized image,
    then the thumbnail. (The original's `image.resize` default is BICUBIC for RGB images.)"""
    cols, rows = choose_grid(*image.size, min_num=min_num, max_num=max_num, image_size=image_size)
    resized = image.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    size = image_size
    tiles = [resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
             for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def _normalize_lut() -> np.ndarray:
    # [3, 256] float32: exactly ToTensor's `x.float().div(255)` then Normalize's `(x - mean) / std`,
    # all in float32; each output depends only on (channel, byte), so a table lookup is exact.
    x = np.arange(256, dtype=np.float32) / np.float32(255)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None]
    return (x[None, :] - mean) / std


_LUT = _normalize_lut()


def normalize(rgb: Image.Image | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """`[H, W, 3]` uint8 RGB -> `[3, H, W]` float32, ImageNet-normalized (into `out` if given)."""
    pixels = np.asarray(rgb, dtype=np.uint8)
    if out is None:
        out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    for c in range(3):
        np.take(_LUT[c], pixels[..., c], out=out[c])
    return out


def image_to_tiles(image: Image.Image, *, dynamic_image_size: bool = True,
                   use_thumbnail: bool = True, min_num: int = 1, max_num: int = 12,
                   image_size: int = IMAGE_SIZE) -> np.ndarray:
    """`[num_tiles, 3, image_size, image_size]` float32 tiles of `image` (any PIL mode)."""
    image = to_rgb(image)
    if not dynamic_image_size:
        return normalize(image.resize((image_size, image_size), Image.Resampling.BICUBIC))[None]
    crops = dynamic_preprocess(image, min_num=min_num, max_num=max_num, image_size=image_size,
                               use_thumbnail=use_thumbnail)
    tiles = np.empty((len(crops), 3, image_size, image_size), dtype=np.float32)
    for k, crop in enumerate(crops):
        normalize(crop, out=tiles[k])
    return tiles


def load_tiles(source: ImageSource, *, max_pixels: int = MAX_PIXELS, **tiling) -> np.ndarray:
    """`load_image` then `image_to_tiles` (keyword arguments as `image_to_tiles`)."""
    return image_to_tiles(load_image(source, max_pixels=max_pixels), **tiling)


def tiles_to_tensor(tiles: np.ndarray, dtype=None):
    """The tiles as a torch tensor (optionally cast to the model dtype, e.g. torch.bfloat16)."""
    import torch

    tensor = torch.from_numpy(tiles)
    return tensor if dtype is None else tensor.to(dtype)
