"""MllamaImageProcessor (PIL + numpy) and the tiling math shared with the fast processor.

Per image, as transformers does it: RGB with a white background behind transparency ->
choose the tiled canvas -> aspect-preserving resize (PIL bilinear) -> pad bottom/right with 0 ->
rescale and normalise -> split into row-major tiles. Outputs for B samples with up to N images:
pixel_values (B, N, max_image_tiles, 3, S, S) float32, aspect_ratio_ids (B, N),
aspect_ratio_mask (B, N, max_image_tiles) and num_tiles (list of lists).

Input contract (one place, `to_rgb_array`): PIL images in any mode; uint8 arrays/tensors
(H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4}; float arrays in [0, 1]; 16-bit data.
Where we differ from transformers on purpose: 16-bit images are scaled to 8 bits (transformers
clips them to 255, a white picture); float arrays are scaled once (transformers rescales them
twice); an ambiguous numpy array such as (3, 100, 3) is read as height x width x channels, the
layout of `np.asarray(pil_image)` (torch tensors as channels-first), where transformers guesses.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .batch_feature import BatchFeature, convert_tensors
from .image_io import ImageLoadError, load_image

_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


# ----------------------------------------------------------------------------- tiling math
@lru_cache(maxsize=16)
def get_all_supported_aspect_ratios(max_image_tiles: int) -> tuple[tuple[int, int], ...]:
    """(rows, cols) tile grids with rows * cols <= max_image_tiles; aspect ratio id = index + 1."""
    return tuple((rows, cols) for rows in range(1, max_image_tiles + 1)
                 for cols in range(1, max_image_tiles + 1) if rows * cols <= max_image_tiles)


@lru_cache(maxsize=1024)
def get_optimal_tiled_canvas(height: int, width: int, max_image_tiles: int, tile_size: int) -> tuple[int, int]:
    """The canvas (height, width) needing the least upscaling, else the least downscaling; ties: least area."""
    canvases = [(rows * tile_size, cols * tile_size) for rows, cols in get_all_supported_aspect_ratios(max_image_tiles)]
    scales = [min(h / height, w / width) for h, w in canvases]
    upscales = [s for s in scales if s >= 1]
    chosen = min(upscales) if upscales else max(scales)
    candidates = [c for c, s in zip(canvases, scales) if s == chosen]
    return min(candidates, key=lambda c: c[0] * c[1])  # min() keeps the first on an exact tie


def get_image_size_fit_to_canvas(height: int, width: int, canvas_height: int, canvas_width: int,
                                 tile_size: int) -> tuple[int, int]:
    """Resized (height, width): aspect kept, within the canvas, upscaled until a side reaches one tile."""
    target_width = min(max(width, tile_size), canvas_width)
    target_height = min(max(height, tile_size), canvas_height)
    scale_h, scale_w = target_height / height, target_width / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_height), target_width
    return target_height, min(math.floor(width * scale_h) or 1, target_width)


def plan_resize(height: int, width: int, max_image_tiles: int, tile_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((new_height, new_width), (rows, cols)) for an image of (height, width)."""
    canvas_h, canvas_w = get_optimal_tiled_canvas(height, width, max_image_tiles, tile_size)
    new_size = get_image_size_fit_to_canvas(height, width, canvas_h, canvas_w, tile_size)
    return new_size, (canvas_h // tile_size, canvas_w // tile_size)


def aspect_ratio_ids_and_mask(grids: list[list[tuple[int, int]]], max_image_tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """ids (B, N) int64, 0 = no image; mask (B, N, max_image_tiles) int64 with tile 0 always set."""
    supported = get_all_supported_aspect_ratios(max_image_tiles)
    num_images = max(len(sample) for sample in grids)
    ids = np.zeros((len(grids), num_images), dtype=np.int64)
    mask = np.zeros((len(grids), num_images, max_image_tiles), dtype=np.int64)
    mask[:, :, 0] = 1  # Meta pads missing images with a (1, 1) grid
    for b, sample in enumerate(grids):
        for j, (rows, cols) in enumerate(sample):
            ids[b, j] = supported.index((rows, cols)) + 1
            mask[b, j, : rows * cols] = 1
    return ids, mask


def normalization_table(rescale_factor: float, mean: Sequence[float], std: Sequence[float], do_rescale: bool,
                        do_normalize: bool) -> np.ndarray:
    """(3, 256) float32: the normalised value of every uint8 level, computed like transformers
    (rescale in float64 then cast, normalise in float32), so a table lookup is bit-exact."""
    table = np.arange(256, dtype=np.float64)
    table = (table * rescale_factor if do_rescale else table).astype(np.float32)
    table = np.repeat(table[None], 3, axis=0)
    if do_normalize:
        table = (table - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    return table


# ----------------------------------------------------------------------------- inputs
def to_rgb_array(image: Any) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a PIL image, numpy array or torch tensor (see the module docstring)."""
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if type(image).__module__.startswith("torch"):
        array = image.detach().cpu().numpy()
        channels_first = array.ndim == 3 and array.shape[0] in (1, 3, 4)
    elif isinstance(image, np.ndarray):
        array = image
        channels_first = array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4)
    else:
        raise ImageLoadError(f"Expected a PIL image, numpy array or torch tensor, got {type(image).__name__}.")
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim != 3 or (array.shape[0] if channels_first else array.shape[-1]) not in (1, 3, 4):
        raise ImageLoadError(f"An image array must be (H, W), (H, W, C) or (C, H, W) with C = 1, 3 or 4; got shape "
                             f"{tuple(array.shape)}. Pass one image at a time or a list of images.")
    if channels_first:
        array = np.moveaxis(array, 0, -1)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageLoadError(f"The image array has no pixels (shape {tuple(array.shape)}). Pass a non-empty image.")
    array = _to_uint8(array)
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:  # composite onto white, rounded like transformers' convert_to_rgb
        alpha = array[..., 3:] / 255
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ImageLoadError("A float image array must hold values in [0, 1]. Scale it, or pass uint8 values "
                                 "in 0..255.")
        return np.round(array * 255).astype(np.uint8)
    if array.dtype.kind in "ui" and array.size and array.min() >= 0 and array.max() <= 65535:
        return (array.astype(np.uint16) / 257).round().astype(np.uint8) if array.max() > 255 else array.astype(np.uint8)
    raise ImageLoadError(f"Unsupported image array dtype {array.dtype} or range. Pass uint8 (0..255), uint16 "
                         "(0..65535) or float (0..1) values.")


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        return to_rgb_array(np.asarray(image))
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def make_nested_images(images: Any) -> list[list[Any]]:
    """One image, a list (one sample) or a list of lists (one per sample) -> list of lists."""
    if isinstance(images, (list, tuple)):
        if images and all(isinstance(sample, (list, tuple)) for sample in images):
            return [list(sample) for sample in images]
        return [list(images)]
    if hasattr(images, "ndim") and images.ndim == 4:  # a stacked batch of images: one sample
        return [list(images)]
    return [[images]]


def load_nested_images(images: Any) -> list[list[Any]]:
    """Nested list with file paths, URLs and bytes decoded by `load_image`; arrays and PIL images kept."""
    nested = make_nested_images(images)
    if not any(nested):
        raise ValueError("No images were given. Pass at least one image, or call the processor with text only.")
    return [[img if isinstance(img, Image.Image) or hasattr(img, "ndim") else load_image(img) for img in sample]
            for sample in nested]


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ImageProcessorSettings:
    """The fields of preprocessor_config.json that the processing uses (defaults: the Hub's 11B files)."""

    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    do_pad: bool = True
    max_image_tiles: int = 4
    resample: int = Image.Resampling.BILINEAR
    tile_size: int = 560

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "the image processor config") -> ImageProcessorSettings:
        values = {f.name: config[f.name] for f in fields(cls) if f.name in config and f.name != "tile_size"}
        size = config.get("size", {"height": cls.tile_size, "width": cls.tile_size})
        if not isinstance(size, dict) or size.get("height") != size.get("width") or not size.get("height"):
            raise ValueError(f"`size` in {source} must be a square {{'height': S, 'width': S}}, got {size!r}.")
        for name in ("image_mean", "image_std"):
            if name in values:
                values[name] = tuple(values[name]) if isinstance(values[name], (list, tuple)) else (values[name],) * 3
                if len(values[name]) != 3:
                    raise ValueError(f"`{name}` in {source} must have 3 values (R, G, B), got {values[name]!r}.")
        if values.get("do_resize") is False or values.get("do_pad") is False:
            raise ValueError(f"{source}: Mllama requires do_resize=true and do_pad=true (the model only sees tiles).")
        if not isinstance(values.get("max_image_tiles", 4), int) or values.get("max_image_tiles", 4) < 1:
            raise ValueError(f"`max_image_tiles` in {source} must be a positive integer, got "
                             f"{values['max_image_tiles']!r}.")
        return cls(**values, tile_size=int(size["height"]))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ImageProcessorSettings:
        """Read preprocessor_config.json (Hub layout) or processor_config.json's image_processor entry."""
        folder = Path(folder)
        for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
            path = folder / name
            if path.is_file():
                try:
                    config = json.loads(path.read_text())
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path} is not valid JSON ({error}). Restore the file from the checkpoint.")
                if key is not None:
                    if key not in config:
                        continue
                    config = config[key]
                return cls.from_dict(config, str(path))
        raise FileNotFoundError(f"No preprocessor_config.json (or processor_config.json with an 'image_processor' "
                                f"entry) in {folder}. Pass the folder of a Mllama checkpoint.")

    def replace(self, **overrides: Any) -> ImageProcessorSettings:
        """A validated copy with some fields (named as in preprocessor_config.json) changed."""
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        return self.from_dict({**current, "size": {"height": self.tile_size, "width": self.tile_size}, **overrides},
                              "the arguments")

    def table(self) -> np.ndarray:
        return normalization_table(self.rescale_factor, self.image_mean, self.image_std, self.do_rescale,
                                   self.do_normalize)


# ----------------------------------------------------------------------------- the processor
class MllamaImageProcessor:
    """PIL/numpy image processor, numerically equal to transformers' MllamaImageProcessor (PIL backend)."""

    model_input_names = ["pixel_values", "num_tiles", "aspect_ratio_ids", "aspect_ratio_mask"]

    def __init__(self, settings: ImageProcessorSettings | None = None, **overrides: Any) -> None:
        self.settings = (settings or ImageProcessorSettings()).replace(**overrides)
        self._table = self.settings.table()

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> MllamaImageProcessor:
        return cls(ImageProcessorSettings.from_pretrained(folder), **overrides)

    @property
    def max_image_tiles(self) -> int:
        return self.settings.max_image_tiles

    def __call__(self, images: Any, return_tensors: str | None = "pt", max_image_tiles: int | None = None,
                 **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, max_image_tiles=max_image_tiles, **kwargs)

    def preprocess(self, images: Any, return_tensors: str | None = "pt", max_image_tiles: int | None = None,
                   **kwargs: Any) -> BatchFeature:
        if kwargs:
            raise TypeError(f"Unexpected arguments {sorted(kwargs)}; the image processor takes images, "
                            "return_tensors and max_image_tiles.")
        tiles_max = max_image_tiles or self.settings.max_image_tiles
        nested = load_nested_images(images)
        tile = self.settings.tile_size
        pixel_values = np.zeros((len(nested), max(map(len, nested)), tiles_max, 3, tile, tile), dtype=np.float32)
        grids = [[self._process_one(img, pixel_values[b, j], tiles_max) for j, img in enumerate(sample)]
                 for b, sample in enumerate(nested)]
        ids, mask = aspect_ratio_ids_and_mask(grids, tiles_max)
        out = convert_tensors({"pixel_values": pixel_values, "aspect_ratio_ids": ids, "aspect_ratio_mask": mask},
                              return_tensors)
        out["num_tiles"] = [[rows * cols for rows, cols in sample] for sample in grids]
        return out

    def _process_one(self, image: Any, out: np.ndarray, max_image_tiles: int) -> tuple[int, int]:
        """Resize, pad, normalise and tile one image into `out` (max_image_tiles, 3, S, S); returns (rows, cols)."""
        rgb = to_rgb_array(image)
        (new_h, new_w), grid = plan_resize(rgb.shape[0], rgb.shape[1], max_image_tiles, self.settings.tile_size)
        resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), resample=self.settings.resample))
        normalize_into_tiles(np.moveaxis(resized, -1, 0), grid, self._table, out)
        return grid


def normalize_into_tiles(image: np.ndarray, grid: tuple[int, int], table: np.ndarray, out: np.ndarray) -> None:
    """Write the (3, h, w) uint8 `image`, padded bottom/right with level 0 and normalised through `table`
    (3, 256), as row-major tiles into `out` (>= rows*cols, 3, S, S)."""
    rows, cols = grid
    tile = out.shape[-1]
    for k in range(rows * cols):
        part = image[:, (k // cols) * tile:(k // cols + 1) * tile, (k % cols) * tile:(k % cols + 1) * tile]
        height, width = part.shape[1:]
        for c in range(3):
            out[k, c, height:] = table[c, 0]  # padding is level 0, i.e. black
            out[k, c, :height, width:] = table[c, 0]
            np.take(table[c], part[c], out=out[k, c, :height, :width])
