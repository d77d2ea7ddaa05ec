"""runtime/image_tiling.py against an implementation we did not write: transformers' GotOcr2 PIL
image processor, which InternVL's -hf port uses and which shares InternVL's grid rule.

Where the two agree, the tiles must be equal bit for bit: both resize with Pillow's bicubic, and
transformers' `uint8 * (1/255)` in float64 rounded to float32 equals torchvision's float32
`x / 255` for all 256 byte values (checked below), after which both normalize with the same
float32 `(x - mean) / std`.

Where they differ on purpose we follow the ORIGINAL OpenGVLab code and pin the difference here
(so this test fails if either side changes):
1. Grid order at exact ties. The original sorts a Python *set* of grids by tile count; transformers
   sorts a nested-loop list. Grids with equal tile count come out in different orders, and the
   order decides exact ties. With min_num=1 (every InternVL release) no image size is affected,
   which is checked at every exact tie point below; with min_num > 1 choices do differ.
2. Transparency. The original's `Image.open(f).convert('RGB')` drops alpha; transformers'
   `convert_to_rgb` composites onto white.
3. 16-bit grayscale: ours keeps the high byte; Pillow's `convert('RGB')` (hence the original)
   clips at 255, a nearly white image. transformers cannot take such images at all.
"""

import io
import struct
import zlib
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from internvl_aot.runtime import image_tiling as it

transformers = pytest.importorskip("transformers")
# The torchvision-backed GotOcr2ImageProcessor falls back to this class without torchvision.
from transformers import GotOcr2ImageProcessorPil  # noqa: E402
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (  # noqa: E402
    get_all_supported_aspect_ratios, get_optimal_tiled_canvas)

RNG_SEED = 20240611


@pytest.fixture(scope="module")
def hf_processor():
    verbosity = transformers.logging.get_verbosity()
    # It logs "channel dimension is ambiguous" for 1- and 3-pixel-wide images (and guesses right).
    transformers.logging.set_verbosity_error()

    def make(**kwargs):
        settings = dict(size={"height": 448, "width": 448}, image_mean=list(it.IMAGENET_MEAN),
                        image_std=list(it.IMAGENET_STD), resample=Image.Resampling.BICUBIC,
                        crop_to_patches=True, min_patches=1, max_patches=12)
        return GotOcr2ImageProcessorPil(**(settings | kwargs))

    yield make
    transformers.logging.set_verbosity(verbosity)


def hf_tiles(make, image, **kwargs):
    out = make(**kwargs)(image, return_tensors="np")
    assert out["num_patches"] == [len(out["pixel_values"])]
    return out["pixel_values"]


def noise(width, height, rng, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "CMYK": 4}[mode]
    pixels = rng.randint(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def assert_same_tiles(ours, theirs):
    assert ours.dtype == np.float32 and theirs.dtype == np.float32
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs), f"max abs diff {np.abs(ours - theirs).max()}"


# Exact tie points for min_num=1, max_num=12 (checked to be ties in `test_tie_sizes_are_ties`),
# with the grid each one must get. At 7:8 the tie is between ratio 1 ((1,1), (2,2), (3,3)) and 3/4
# ((3,4)); at 7:4 between 3/2 and 2 ((2,1), (3,2), (4,2)); squares and 2:1 tie between grids of one
# ratio; 9:20, 23:2 and 21:220 are small images, which keep the first (fewest-tile) grid. Each
# pair straddles the area threshold (0.5 * 448 * 448 * tiles) that lets the next, larger grid win.
TIE_SIZES = {
    (7, 8): (1, 1), (1022, 1168): (3, 3), (1029, 1176): (3, 4),
    (7, 4): (2, 1), (1029, 588): (3, 2), (1183, 676): (3, 2), (1190, 680): (4, 2),
    (633, 633): (1, 1), (634, 634): (2, 2), (950, 950): (2, 2), (951, 951): (3, 3),
    (1266, 633): (2, 1), (1268, 634): (4, 2), (9, 20): (1, 2), (23, 2): (11, 1), (21, 220): (1, 10),
}
EXTREME_SIZES = [(1, 1), (5, 7), (2, 1), (1, 3), (1, 2000), (2000, 1), (3000, 20), (20, 3000)]


def random_sizes(count, rng):
    # Log-uniform sides from 1 to 3000 px: aspect ratios from ~1:3000 to ~3000:1.
    sides = np.exp(rng.uniform(0, np.log(3000), (count, 2))).astype(int)
    return [(int(w), int(h)) for w, h in sides]


def test_tiles_equal_transformers_pixel_for_pixel(hf_processor):
    rng = np.random.RandomState(RNG_SEED)
    sizes = random_sizes(36, rng) + EXTREME_SIZES + list(TIE_SIZES)
    assert len(sizes) >= 50
    for width, height in sizes:
        image = noise(width, height, rng)
        ours = it.image_to_tiles(image)
        assert ours.shape[0] == it.count_tiles(width, height), (width, height)
        assert_same_tiles(ours, hf_tiles(hf_processor, image))
        cols, rows = it.choose_grid(width, height)
        assert (cols, rows) == get_optimal_tiled_canvas((height, width), (448, 448), 1, 12)
        if (width, height) in TIE_SIZES:
            assert (cols, rows) == TIE_SIZES[width, height]


def test_tile_count_without_pixels_matches_tiling():
    # (The default settings are checked against real tiles in the test above.)
    rng = np.random.RandomState(RNG_SEED + 1)
    settings = [dict(use_thumbnail=False), dict(use_thumbnail=True, max_num=6),
                dict(use_thumbnail=True, min_num=2, max_num=4)]
    for width, height in random_sizes(12, rng) + EXTREME_SIZES[:4] + list(TIE_SIZES)[:4]:
        image = noise(width, height, rng)
        for kwargs in settings:
            crops = it.dynamic_preprocess(image, **kwargs)
            assert len(crops) == it.count_tiles(width, height, **kwargs)
        assert it.count_tiles(width, height, dynamic_image_size=False) == 1


def test_other_settings_equal_transformers(hf_processor):
    rng = np.random.RandomState(RNG_SEED + 2)
    for width, height in [(1000, 300), (640, 480), (37, 1500), (3, 2)]:
        image = noise(width, height, rng)
        # InternVL-Chat-V1-2: one bicubic 448x448 squash of the whole image.
        squash = it.image_to_tiles(image, dynamic_image_size=False)
        assert squash.shape == (1, 3, 448, 448)
        assert_same_tiles(squash, hf_tiles(hf_processor, image, crop_to_patches=False))
        for max_num in (1, 6):
            assert_same_tiles(it.image_to_tiles(image, max_num=max_num),
                              hf_tiles(hf_processor, image, max_patches=max_num))
        # Thumbnail off: transformers always appends it (last) when there is more than one tile.
        theirs = hf_tiles(hf_processor, image)
        ours = it.image_to_tiles(image, use_thumbnail=False)
        assert_same_tiles(ours, theirs[:-1] if len(theirs) > 1 else theirs)
        assert len(ours) == it.count_tiles(width, height, use_thumbnail=False)


def test_float_path_matches_torchvision_to_tensor():
    values = np.arange(256, dtype=np.uint8)
    transformers_path = (values.astype(np.float64) * (1 / 255)).astype(np.float32)
    torchvision_path = values.astype(np.float32) / np.float32(255)
    assert np.array_equal(transformers_path, torchvision_path)
    torch = pytest.importorskip("torch")
    to_tensor = torch.from_numpy(values).float().div(255)  # what T.ToTensor does on uint8
    normalized = (to_tensor[None] - torch.tensor(it.IMAGENET_MEAN)[:, None]) / torch.tensor(
        it.IMAGENET_STD)[:, None]
    assert np.array_equal(it.normalize(values.reshape(1, 256, 1).repeat(3, axis=2))[:, 0],
                          normalized.numpy())
    tiles = it.normalize(np.zeros((448, 448, 3), np.uint8))[None]
    tensor = it.tiles_to_tensor(tiles, torch.bfloat16)
    assert tensor.shape == (1, 3, 448, 448) and tensor.dtype == torch.bfloat16


# ------------------------------------------------------------------ grid order and ties

def exact_tie(width, height, grids, image_size=448):
    diffs = [abs(width / height - c / r) for c, r in grids]
    return sum(d == min(diffs) for d in diffs) > 1


def test_tie_sizes_are_ties():
    grids = it.target_grids(1, 12)
    for (width, height), grid in TIE_SIZES.items():
        assert exact_tie(width, height, grids), (width, height)
        assert it.choose_grid(width, height) == grid


def test_grid_orders_are_pinned():
    # CPython's set order for these tuples (the original's order) vs transformers' list order.
    assert it.target_grids(1, 12) == [
        (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6),
        (6, 1), (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3),
        (9, 1), (2, 5), (5, 2), (10, 1), (1, 10), (11, 1), (1, 11), (12, 1), (3, 4), (4, 3),
        (1, 12), (6, 2), (2, 6)]
    assert get_all_supported_aspect_ratios(1, 12) == [
        (1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (2, 2), (4, 1), (1, 5), (5, 1), (1, 6),
        (2, 3), (3, 2), (6, 1), (1, 7), (7, 1), (1, 8), (2, 4), (4, 2), (8, 1), (1, 9), (3, 3),
        (9, 1), (1, 10), (2, 5), (5, 2), (10, 1), (1, 11), (11, 1), (1, 12), (2, 6), (3, 4), (4, 3),
        (6, 2), (12, 1)]
    assert sorted(it.target_grids(1, 12)) == sorted(get_all_supported_aspect_ratios(1, 12))


def tie_sizes(grids, limit=4000):
    """Every size up to `limit` whose aspect ratio is the exact midpoint of two neighbouring grid
    ratios: the only places where two different grids can tie (a tie between grids of one ratio
    is settled by tile count, whose order both sides share)."""
    ratios = sorted({Fraction(c, r) for c, r in grids})
    for low, high in zip(ratios, ratios[1:]):
        mid = (low + high) / 2
        for k in range(1, limit // max(mid.numerator, mid.denominator) + 1):
            yield mid.numerator * k, mid.denominator * k


def test_min_num_1_orders_never_change_the_grid():
    # With min_num=1 the two orders pick the same grid at every exact tie, for any max_num used in
    # practice (an exhaustive sweep of all sizes up to 1500x1500 at max_num=12 agreed as well).
    for max_num in (2, 4, 6, 8, 12, 24, 40):
        grids = it.target_grids(1, max_num)
        for width, height in tie_sizes(grids, limit=1500 if max_num > 12 else 4000):
            ours = it.find_closest_aspect_ratio(width / height, grids, width, height, 448)
            assert ours == get_optimal_tiled_canvas((height, width), (448, 448), 1, max_num), (
                width, height, max_num)


def test_min_num_above_1_follows_the_original_not_transformers(hf_processor):
    # min_num=max_num=4, a 5:2 image: 4:1 and 2:2 are equally far (|2.5-4| == |2.5-1| == 1.5).
    # The first in order wins unless the image covers more than half the later grid's area
    # (0.5 * 448 * 448 * 4 = 401408 px). The original's set order is (4,1), (1,4), (2,2);
    # transformers' is (1,4), (2,2), (4,1). So the choices are swapped:
    assert it.target_grids(4, 4) == [(4, 1), (1, 4), (2, 2)]
    assert get_all_supported_aspect_ratios(4, 4) == [(1, 4), (2, 2), (4, 1)]
    for (width, height), ours, theirs in [((5, 2), (4, 1), (2, 2)), ((1500, 600), (2, 2), (4, 1))]:
        assert it.choose_grid(width, height, min_num=4, max_num=4) == ours
        assert get_optimal_tiled_canvas((height, width), (448, 448), 4, 4) == theirs
    image = noise(5, 2, np.random.RandomState(RNG_SEED + 3))
    ours = it.image_to_tiles(image, min_num=4, max_num=4)
    theirs = hf_tiles(hf_processor, image, min_patches=4, max_patches=4)
    assert ours.shape == theirs.shape == (5, 3, 448, 448)
    assert not np.array_equal(ours[:4], theirs[:4])
    assert_same_tiles(ours[4:], theirs[4:])  # the thumbnail does not depend on the grid


# ------------------------------------------------------------------ colour modes

def test_modes_without_alpha_equal_transformers(hf_processor):
    rng = np.random.RandomState(RNG_SEED + 4)
    rgb = noise(300, 200, rng)
    images = [noise(300, 200, rng, "L"), noise(300, 200, rng, "CMYK"),
              rgb.convert("P", palette=Image.Palette.ADAPTIVE), rgb.convert("1"),
              rgb.convert("YCbCr")]
    for image in images:
        assert_same_tiles(it.image_to_tiles(image), hf_tiles(hf_processor, image))
        assert_same_tiles(it.image_to_tiles(image), it.image_to_tiles(image.convert("RGB")))


def test_alpha_is_dropped_like_the_original(hf_processor):
    rng = np.random.RandomState(RNG_SEED + 5)
    rgba = noise(300, 200, rng, "RGBA")
    pixels = np.asarray(rgba).copy()
    pixels[:100, :, 3] = 0  # transparent half whose hidden colour the original still sees
    rgba = Image.fromarray(pixels, "RGBA")
    ours = it.image_to_tiles(rgba)
    assert_same_tiles(ours, hf_tiles(hf_processor, rgba.convert("RGB")))
    assert not np.array_equal(ours, hf_tiles(hf_processor, rgba))  # transformers: white background
    for mode in ("LA", "PA"):
        image = rgba.convert(mode)
        assert_same_tiles(it.image_to_tiles(image), it.image_to_tiles(image.convert("RGB")))


def test_16_bit_grayscale_keeps_its_high_byte():
    high = np.random.RandomState(RNG_SEED + 6).randint(0, 256, (50, 70)).astype(np.uint16)
    image = Image.fromarray(high * 256 + 255)
    assert image.mode == "I;16"
    expected = it.image_to_tiles(Image.fromarray(high.astype(np.uint8), "L"))
    assert_same_tiles(it.image_to_tiles(image), expected)
    assert_same_tiles(it.image_to_tiles(image.convert("I")), expected)
    assert np.asarray(image.convert("RGB")).min() == 255  # what a plain convert would have given


# ------------------------------------------------------------------ loading and errors

def png_header_only(width, height):
    """A PNG that declares `width x height` and holds no pixel data: a cheap decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_load_from_path_and_bytes(tmp_path):
    image = noise(123, 45, np.random.RandomState(RNG_SEED + 7), "RGBA")
    path = tmp_path / "a.png"
    image.save(path)
    for source in (path, str(path), path.read_bytes()):
        loaded = it.load_image(source)
        assert loaded.mode == "RGB" and loaded.size == (123, 45)
        assert np.array_equal(np.asarray(loaded), np.asarray(Image.open(path).convert("RGB")))
        assert it.read_image_size(source) == (123, 45)
    assert_same_tiles(it.load_tiles(path, max_num=6), it.image_to_tiles(image, max_num=6))
    assert it.read_image_size(png_header_only(4000, 3000)) == (4000, 3000)  # no pixels to decode


def test_unusable_files_raise_a_clear_error(tmp_path):
    good = io.BytesIO()
    noise(64, 64, np.random.RandomState(RNG_SEED + 8)).save(good, format="JPEG")
    files = {
        "notes.txt": b"this is not an image\n",
        "empty.png": b"",
        "truncated.jpg": good.getvalue()[: len(good.getvalue()) // 2],
        "garbage.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "bomb.png": png_header_only(10_000, 10_000),  # over our limit, under Pillow's error limit
        "huge.png": png_header_only(30_000, 30_000),  # over Pillow's own error limit too
    }
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(it.ImageLoadError) as info:
            it.load_image(path)
        message = str(info.value)
        assert isinstance(info.value, ValueError)
        assert str(path) in message and "\n" not in message, message
    with pytest.raises(it.ImageLoadError, match="not found"):
        it.load_image(tmp_path / "missing.jpg")
    with pytest.raises(it.ImageLoadError, match="directory"):
        it.load_image(tmp_path)
    with pytest.raises(it.ImageLoadError, match="bytes"):
        it.load_image(b"not an image")
    with pytest.raises(it.ImageLoadError, match="too large"):
        it.read_image_size(good.getvalue(), max_pixels=64 * 64 - 1)
