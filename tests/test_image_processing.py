"""MllamaImageProcessor equals transformers' (PIL backend); the fast one agrees within two pixel levels."""
from __future__ import annotations

import base64
import functools
import http.server
import json
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from model.image_io import ImageLoadError, load_image
from model.image_processing import (HUB_SETTINGS, MllamaImageProcessor, get_all_supported_aspect_ratios,
                                    normalize_into_tiles,
                                    get_optimal_tiled_canvas)
from model.image_processing_fast import MllamaImageProcessorFast, resize_via_float

STD_MIN = min(0.26862954, 0.26130258, 0.27577711)
# The resize is separable (a horizontal and a vertical pass) and both PIL and torch round each pass
# to uint8 with their own fixed-point weights: each pass may land one level apart, so a pixel may
# differ by two levels at most. Two levels after normalising, plus float32 rounding:
FAST_TOLERANCE = 2 / (255 * STD_MIN) + 1e-5
rng = np.random.default_rng(1234)


def noise(width: int, height: int, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def pil(width: int, height: int, mode: str = "RGB") -> Image.Image:
    if mode in ("RGB", "RGBA", "CMYK"):
        return Image.fromarray(noise(width, height, len(mode)), mode)
    if mode == "L":
        return Image.fromarray(noise(width, height, 1))
    if mode == "LA":
        return Image.fromarray(noise(width, height, 4)).convert("LA")
    if mode == "1":
        return Image.fromarray(noise(width, height, 1)).convert("1")
    if mode == "P":
        return Image.fromarray(noise(width, height)).quantize(16)
    if mode == "P+transparency":
        image = Image.fromarray(noise(width, height)).quantize(16)
        image.info["transparency"] = 3
        return image
    raise ValueError(mode)


# Every supported grid (rows, cols) for 4 tiles has a size that selects it.
GRID_SIZES = {(1, 1): (300, 200), (1, 2): (900, 500), (1, 3): (1500, 520), (1, 4): (2100, 500),
              (2, 1): (500, 900), (2, 2): (900, 900), (3, 1): (520, 1500), (4, 1): (500, 2100)}

CASES = {
    **{f"grid_{r}x{c}_{w}x{h}": lambda w=w, h=h: pil(w, h) for (r, c), (w, h) in GRID_SIZES.items()},
    "tiny_1x1": lambda: pil(1, 1),
    "tiny_2x3": lambda: pil(2, 3),
    "tiny_5x5": lambda: pil(5, 5),
    "small_100x50": lambda: pil(100, 50),
    "exact_tile_560x560": lambda: pil(560, 560),
    "one_over_tile_561x560": lambda: pil(561, 560),
    "extreme_1x4000": lambda: pil(1, 4000),
    "extreme_4000x1": lambda: pil(4000, 1),
    "extreme_2000x100": lambda: pil(2000, 100),
    "extreme_100x2000": lambda: pil(100, 2000),
    "extreme_3000x40": lambda: pil(3000, 40),
    "photo_1280x853": lambda: pil(1280, 853),
    "huge_4000x3000": lambda: pil(4000, 3000),
    "huge_2300x2300": lambda: pil(2300, 2300),
    "mode_RGBA": lambda: pil(120, 80, "RGBA"),
    "mode_L": lambda: pil(90, 70, "L"),
    "mode_LA": lambda: pil(90, 70, "LA"),
    "mode_1": lambda: pil(90, 70, "1"),
    "mode_P": lambda: pil(90, 70, "P"),
    "mode_P_transparency": lambda: pil(90, 70, "P+transparency"),
    "mode_CMYK": lambda: pil(90, 70, "CMYK"),
    "numpy_hwc": lambda: noise(130, 90),
    "numpy_chw": lambda: np.moveaxis(noise(130, 90), -1, 0).copy(),
    "numpy_rgba_hwc": lambda: noise(130, 90, 4),
    "numpy_gray_hw1": lambda: noise(130, 90, 1)[:, :, None],
    "torch_chw": lambda: torch.from_numpy(np.moveaxis(noise(130, 90), -1, 0).copy()),
    "batch_two_samples": lambda: [[pil(800, 600)], [pil(100, 100), pil(2000, 500)]],
    "batch_flat_list_one_sample": lambda: [pil(64, 48), pil(48, 64, "L")],
    "batch_three_samples_uneven": lambda: [[pil(30, 30)], [pil(700, 300), pil(20, 90), pil(600, 600)], [pil(9, 9)]],
}


def assert_same_outputs(ours, ref, pixel_atol: float, what: str) -> None:
    for key in ("aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(ours[key], torch.as_tensor(ref[key])), f"{what}: {key} differs"
    assert ours["num_tiles"] == [list(n) for n in ref["num_tiles"]], f"{what}: num_tiles differ"
    expected = torch.as_tensor(ref["pixel_values"])
    assert ours["pixel_values"].shape == expected.shape, f"{what}: pixel_values shape differs"
    assert ours["pixel_values"].dtype == torch.float32
    diff = (ours["pixel_values"] - expected).abs().max().item()
    assert diff <= pixel_atol, f"{what}: pixel_values differ by {diff} > {pixel_atol}"


@pytest.fixture(scope="module")
def ours() -> MllamaImageProcessor:
    return MllamaImageProcessor(HUB_SETTINGS)


@pytest.fixture(scope="module")
def fast() -> MllamaImageProcessorFast:
    return MllamaImageProcessorFast(HUB_SETTINGS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_pil_processor_equals_transformers(case, ours, reference_image_processor):
    images = CASES[case]()
    ref = reference_image_processor(images, return_tensors="pt")
    assert_same_outputs(ours(images, return_tensors="pt"), ref, 1e-5, case)


@pytest.mark.parametrize("case", ["grid_2x2_900x900", "tiny_5x5", "photo_1280x853", "extreme_1x4000",
                                  "batch_two_samples", "mode_RGBA", "torch_chw", "extreme_2000x100"])
def test_fast_processor_agrees_with_pil_processor_within_two_levels(case, ours, fast):
    images = CASES[case]()
    expected = ours(images)
    got = fast(images)
    assert_same_outputs(got, expected, FAST_TOLERANCE, case)
    mean = (got["pixel_values"] - expected["pixel_values"]).abs().mean().item()
    assert mean < 1e-3, f"{case}: mean abs difference {mean} suggests more than rounding differences"


def test_max_image_tiles_argument_is_honoured_like_transformers(ours, reference_image_processor):
    image = pil(2100, 500)
    ref = reference_image_processor(image, return_tensors="pt", max_image_tiles=2)
    assert_same_outputs(ours(image, max_image_tiles=2, return_tensors="pt"), ref, 1e-5, "max_image_tiles=2")
    assert ours(image, max_image_tiles=2)["pixel_values"].shape[2] == 2


def test_supported_aspect_ratios_are_rows_by_cols_in_meta_order():
    assert get_all_supported_aspect_ratios(4) == ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))


@pytest.mark.parametrize("size, canvas", [((5, 5), (560, 560)), ((100, 50), (560, 560)), ((561, 560), (560, 1120)),
                                          ((800, 600), (1120, 1120)), ((1121, 560), (560, 1680)),
                                          ((300, 1200), (1680, 560)), ((2000, 100), (560, 2240))])
def test_canvas_choice_matches_spec_table(size, canvas):
    width, height = size
    assert get_optimal_tiled_canvas(height, width, 4, 560) == canvas


def test_missing_image_slots_and_unused_tiles_are_exact_zero(ours):
    out = ours([[pil(100, 100)], [pil(100, 100), pil(900, 900)]], return_tensors="pt")
    assert out["pixel_values"][0, 1].abs().sum() == 0, "a missing image slot must be exactly 0"
    assert out["pixel_values"][0, 0, 1:].abs().sum() == 0, "tiles past an image's count must be exactly 0"
    assert out["aspect_ratio_mask"][0, 1].tolist() == [1, 0, 0, 0], "tile 0 of a missing slot is set (Meta's padding)"


def test_two_dimensional_arrays_are_grayscale(ours):
    gray = noise(50, 40, 1)
    assert np.array_equal(ours(gray)["pixel_values"], ours(gray[:, :, None])["pixel_values"])


def test_sixteen_bit_images_are_scaled_to_eight_bits_not_clipped(ours):
    levels = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    image16 = Image.fromarray(levels)
    image8 = Image.fromarray((levels / 257).round().astype(np.uint8))
    assert np.array_equal(ours(image16)["pixel_values"], ours(image8)["pixel_values"])


def test_transparent_pixels_become_white(ours):
    transparent = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    white = Image.new("RGB", (40, 40), (255, 255, 255))
    assert np.array_equal(ours(transparent)["pixel_values"], ours(white)["pixel_values"])


def test_settings_are_read_from_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 224, "width": 224},
                                                                   "max_image_tiles": 2, "image_mean": [0.5] * 3}))
    processor = MllamaImageProcessor.from_pretrained(tmp_path)
    assert processor(pil(10, 10))["pixel_values"].shape == (1, 1, 2, 3, 224, 224)
    assert processor.settings.image_mean == (0.5, 0.5, 0.5)


def test_settings_are_read_from_processor_config_image_processor_entry(tmp_path):
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {"size": {"height": 112,
                                                                                            "width": 112}}}))
    assert MllamaImageProcessorFast.from_pretrained(tmp_path).settings.tile_size == 112


def test_missing_config_names_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        MllamaImageProcessor.from_pretrained(tmp_path)


@pytest.mark.parametrize("config, message", [({"size": {"height": 560, "width": 448}}, "must be a square"),
                                             ({"do_pad": False}, "do_pad=true"),
                                             ({"max_image_tiles": 0}, "positive integer")])
def test_invalid_settings_are_rejected_with_the_field_name(tmp_path, config, message):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        MllamaImageProcessor.from_pretrained(tmp_path)


def test_file_paths_are_loaded(ours, tmp_path):
    image = pil(120, 90)
    image.save(tmp_path / "a.png")
    assert np.array_equal(ours(str(tmp_path / "a.png"))["pixel_values"], ours(image)["pixel_values"])


@pytest.mark.parametrize("array, message", [(np.zeros((5, 5, 5), np.uint8), "C = 1, 3 or 4"),
                                            (np.full((4, 4, 3), 2.0, np.float32), r"\[0, 1\]"),
                                            (np.zeros((0, 4, 3), np.uint8), "no pixels")])
def test_bad_arrays_get_a_clear_error(ours, array, message):
    with pytest.raises(ImageLoadError, match=message):
        ours(array)


def test_no_images_is_an_error_that_points_to_text_only_use(ours):
    with pytest.raises(ValueError, match="No images were given"):
        ours([])


# ----------------------------------------------------------------------------- loading (model/image_io.py)
def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (the pixel data is never reached)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def saved(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_missing_file_error_says_to_check_the_path(tmp_path):
    with pytest.raises(ImageLoadError, match="not found.*Check the path"):
        load_image(tmp_path / "nope.png")


def test_folder_instead_of_file_is_refused(tmp_path):
    with pytest.raises(ImageLoadError, match="is a folder"):
        load_image(tmp_path)


def test_empty_file_is_refused(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.*complete image"):
        load_image(tmp_path / "empty.png")


def test_non_image_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("this is not a picture")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(tmp_path / "notes.txt")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_refused(tmp_path, fmt):
    data = (saved(pil(200, 150), tmp_path / f"full.{fmt}", format=fmt)).read_bytes()
    (tmp_path / "cut").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated or corrupt"):
        load_image(tmp_path / "cut")


def test_file_cut_inside_its_header_is_refused(tmp_path):
    data = (saved(pil(60, 50), tmp_path / "full.png", format="PNG")).read_bytes()
    (tmp_path / "cut").write_bytes(data[:22])  # PIL's PNG reader raises OSError while opening this one
    with pytest.raises(ImageLoadError, match="truncated or corrupt"):
        load_image(tmp_path / "cut")


def test_image_over_the_pixel_limit_is_refused_from_the_header(tmp_path):
    (tmp_path / "big.png").write_bytes(png_header_only(12000, 11000))  # 132 MP: ours refuses, PIL would decode
    with pytest.raises(ImageLoadError, match="132 megapixels, over the limit.*decompression bombs"):
        load_image(tmp_path / "big.png")


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header_only(60000, 60000))
    with pytest.raises(ImageLoadError, match="decompression bombs.*Shrink the image"):
        load_image(tmp_path / "bomb.png")


def test_pixel_limit_is_configurable(tmp_path):
    path = saved(pil(20, 20), tmp_path / "a.png")
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image(path, max_pixels=100)


def test_unsupported_source_type_lists_what_is_accepted():
    with pytest.raises(ImageLoadError, match="file path, an http"):
        load_image(3.5)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    assert load_image(tmp_path / "anim.gif").convert("RGB").getpixel((5, 5)) == (255, 0, 0)


def test_exif_orientation_is_applied_when_loading_files(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = saved(pil(40, 20), tmp_path / "rotated.jpg", exif=exif)
    assert load_image(path).size == (20, 40), "load_image must apply EXIF orientation"
    assert Image.open(path).size == (40, 20), "an opened PIL image is passed to the processor as it is"


@pytest.mark.parametrize("name", ["big.jpg", "big.png"])
def test_max_side_shrinks_a_large_picture_and_remembers_its_size(tmp_path, name):
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 1500 x 4000
    path = saved(pil(4000, 1500), tmp_path / name, exif=exif)
    image = load_image(path, max_side=1000)
    assert image.size == (375, 1000), "shrunk to fit 1000 x 1000, after the EXIF rotation"
    assert image.info["original_size"] == (1500, 4000), "the size the file shows"
    assert "original_size" not in load_image(path, max_side=5000).info, "a picture that fits is left alone"


def test_sixteen_bit_png_loads_and_processes(tmp_path, ours):
    levels = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)
    path = saved(Image.fromarray(levels), tmp_path / "deep.png")
    out = ours(str(path))
    assert out["pixel_values"].shape == (1, 1, 4, 3, 560, 560)
    assert out["pixel_values"][0, 0, 0].std() > 0.1, "a 16-bit gradient must not turn into a flat picture"


def test_cmyk_jpeg_loads_and_processes(tmp_path, ours):
    path = saved(pil(50, 30, "CMYK"), tmp_path / "cmyk.jpg")
    assert load_image(path).mode == "CMYK"
    assert ours(str(path))["aspect_ratio_ids"].tolist() == [[1]]


def test_data_uri_and_bytes_are_accepted(tmp_path):
    data = saved(pil(8, 6), tmp_path / "a.png").read_bytes()
    assert load_image(data).size == (8, 6)
    assert load_image("data:image/png;base64," + base64.b64encode(data).decode()).size == (8, 6)


@pytest.mark.parametrize("size, new_size", [((100, 100), (560, 560)), ((4000, 1), (2240, 1)), ((1, 4000), (1, 2240)),
                                            ((853, 1280), (746, 1120)), ((50, 100), (280, 560))])
def test_float_resize_used_off_cpu_matches_pil_within_one_level(size, new_size):
    """The GPU path (float32 resize, rounded) checked here on CPU, including the single-column case."""
    height, width = size
    array = noise(width, height)
    expected = np.asarray(Image.fromarray(array).resize(new_size[::-1], Image.Resampling.BILINEAR)).astype(int)
    got = resize_via_float(torch.from_numpy(array).permute(2, 0, 1)[None], *new_size)[0].permute(1, 2, 0).numpy()
    assert np.abs(got.astype(int) - expected).max() <= 1, f"{size} -> {new_size}: more than one level from PIL"


def test_torch_normalisation_used_off_cpu_equals_the_table(fast):
    """The GPU normalisation (multiply-add on tiles) checked here on CPU against the numpy table."""
    image = torch.from_numpy(np.moveaxis(noise(900, 500), -1, 0).copy())  # a (1, 2) grid, partial second tile
    expected = np.zeros((4, 3, 560, 560), np.float32)
    normalize_into_tiles(image.numpy(), (1, 2), fast.settings.table(), expected)
    got = torch.zeros((4, 3, 560, 560))
    fast._normalize_into_tiles(image, (1, 2), got)
    assert torch.allclose(got, torch.from_numpy(expected), atol=1e-6), "torch and table normalisation differ"


def test_overrides_are_validated_like_config_fields():
    with pytest.raises(ValueError, match="must be a square"):
        MllamaImageProcessor(size={"height": 560, "width": 100})
    assert MllamaImageProcessorFast(max_image_tiles=2).max_image_tiles == 2


@pytest.fixture
def local_http_folder(tmp_path):
    """Serve tmp_path over http://127.0.0.1 (the only network the tests may use)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *args: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_urls_are_downloaded_and_decoded(local_http_folder):
    folder, url = local_http_folder
    saved(pil(30, 20), folder / "a.png")
    assert load_image(f"{url}/a.png").size == (30, 20)


def test_unreachable_url_says_to_check_the_address(local_http_folder):
    _, url = local_http_folder
    with pytest.raises(ImageLoadError, match="Could not download.*Check the address"):
        load_image(f"{url}/missing.png")
