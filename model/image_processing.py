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
def to_rgb_array(image: Any, channels_first: bool | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a PIL image, numpy array or torch tensor (see the module docstring);
    `channels_first` says how a 3-D array is laid out (None: guess)."""
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if type(image).__module__.startswith("torch"):
        array = image.detach().cpu().numpy()
        guess = array.ndim == 3 and array.shape[0] in (1, 3, 4)
    elif isinstance(image, np.ndarray):
        array = image
        guess = array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4)
    else:
        raise ImageLoadError(f"Expected a PIL image, numpy array or torch tensor, got {type(image).__name__}.")
    channels_first = guess if channels_first is None or array.ndim != 3 else channels_first
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
    """The fields of preprocessor_config.json that the processing uses. Defaults: transformers'
    MllamaImageProcessor() (224-px tiles, mean = std = 0.5); checkpoints set their own (`HUB_SETTINGS`)."""

    do_convert_rgb: bool = True  # always done: the model takes 3 channels
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    do_pad: bool = True
    max_image_tiles: int = 4
    resample: int = Image.Resampling.BILINEAR
    tile_size: int = 224

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "the image processor config") -> ImageProcessorSettings:
        values = {f.name: config[f.name] for f in fields(cls) if f.name in config and f.name != "tile_size"}
        if isinstance(config.get("size"), int):  # transformers also takes one number for a square
            config = {**config, "size": {"height": config["size"], "width": config["size"]}}
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
        if "resample" in values:
            values["resample"] = int(values["resample"])
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

    def to_dict(self) -> dict[str, Any]:
        """The preprocessor_config.json fields, spelled as transformers writes them."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tile_size"}
        out.update(image_mean=list(self.image_mean), image_std=list(self.image_std), resample=int(self.resample),
                   size={"height": self.tile_size, "width": self.tile_size})
        return out


HUB_SETTINGS = ImageProcessorSettings(image_mean=(0.48145466, 0.4578275, 0.40821073),
                                      image_std=(0.26862954, 0.26130258, 0.27577711), tile_size=560)
"""The settings of the official checkpoints' preprocessor_config.json (560-px tiles, CLIP mean/std)."""

# Keyword arguments of a call that are settings for that call only.
CALL_SETTINGS = ("do_convert_rgb", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                 "image_std", "do_pad", "max_image_tiles", "resample", "size")


def channels_first_arg(input_data_format: Any) -> bool | None:
    """transformers' `input_data_format` ("channels_first"/"channels_last" or its enum; None: guess)."""
    if input_data_format is None:
        return None
    value = getattr(input_data_format, "value", input_data_format)
    if value not in ("channels_first", "channels_last"):
        raise ValueError(f"input_data_format must be 'channels_first', 'channels_last' or None, got {value!r}")
    return value == "channels_first"


class ImageProcessorBase:
    """Settings as attributes (`size`, `max_image_tiles`, `image_mean`, ...), dict/JSON/folder round trips
    and per-call overrides, as transformers' image processors have them."""

    model_input_names = ["pixel_values", "num_tiles", "aspect_ratio_ids", "aspect_ratio_mask"]
    settings: ImageProcessorSettings

    def __getattr__(self, name: str) -> Any:
        if name == "size":
            return {"height": self.settings.tile_size, "width": self.settings.tile_size}
        if name in CALL_SETTINGS and "settings" in self.__dict__:
            return getattr(self.settings, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in CALL_SETTINGS:
            self._use(self.settings.replace(**{name: value}))
        else:
            super().__setattr__(name, value)

    def _use(self, settings: ImageProcessorSettings) -> None:
        self.__dict__["settings"] = settings

    def call_settings(self, overrides: dict[str, Any]) -> ImageProcessorSettings:
        """This call's settings: the processor's, with the call's keyword arguments applied."""
        unknown = sorted(k for k in overrides if k not in CALL_SETTINGS)
        if unknown:
            raise TypeError(f"Unexpected arguments {unknown}; the image processor takes images, return_tensors, "
                            f"input_data_format and the settings {', '.join(CALL_SETTINGS)}.")
        given = {k: v for k, v in overrides.items() if v is not None}
        return self.settings.replace(**given) if given else self.settings

    def to_dict(self) -> dict[str, Any]:
        return {**self.settings.to_dict(), "image_processor_type": type(self).__name__}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json_string())

    def save_pretrained(self, folder: str | Path) -> list[str]:
        """Write preprocessor_config.json (what transformers' image processors write)."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        path = Path(folder) / "preprocessor_config.json"
        self.to_json_file(path)
        return [str(path)]

    @classmethod
    def from_dict(cls, config: dict[str, Any], **kwargs: Any):
        """From preprocessor_config.json's fields (keys that are not settings, such as
        `image_processor_type`, are ignored); `kwargs` override them."""
        return cls(ImageProcessorSettings.from_dict(config), **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


# ----------------------------------------------------------------------------- the processor
class MllamaImageProcessor(ImageProcessorBase):
    """PIL/numpy image processor, numerically equal to transformers' MllamaImageProcessor (PIL backend)."""

    def __init__(self, settings: ImageProcessorSettings | None = None, **overrides: Any) -> None:
        self._use((settings or ImageProcessorSettings()).replace(**overrides))

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> MllamaImageProcessor:
        return cls(ImageProcessorSettings.from_pretrained(folder), **overrides)

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def preprocess(self, images: Any, return_tensors: str | None = None, input_data_format: Any = None,
                   **settings: Any) -> BatchFeature:
        """pixel_values, aspect_ratio_ids, aspect_ratio_mask (numpy arrays unless return_tensors is "pt")
        and num_tiles; keyword settings (size, do_rescale, max_image_tiles, ...) apply to this call."""
        call = self.call_settings(settings)
        channels_first = channels_first_arg(input_data_format)
        table = call.table()
        nested = load_nested_images(images)
        tile, tiles_max = call.tile_size, call.max_image_tiles
        pixel_values = np.zeros((len(nested), max(map(len, nested)), tiles_max, 3, tile, tile), dtype=np.float32)
        grids = [[self._process_one(img, pixel_values[b, j], call, table, channels_first)
                  for j, img in enumerate(sample)] for b, sample in enumerate(nested)]
        ids, mask = aspect_ratio_ids_and_mask(grids, tiles_max)
        out = convert_tensors({"pixel_values": pixel_values, "aspect_ratio_ids": ids, "aspect_ratio_mask": mask},
                              return_tensors)
        out["num_tiles"] = [[rows * cols for rows, cols in sample] for sample in grids]
        return out

    @staticmethod
    def _process_one(image: Any, out: np.ndarray, settings: ImageProcessorSettings, table: np.ndarray,
                     channels_first: bool | None) -> tuple[int, int]:
        """Resize, pad, normalise and tile one image into `out` (max_image_tiles, 3, S, S); returns (rows, cols)."""
        rgb = to_rgb_array(image, channels_first)
        (new_h, new_w), grid = plan_resize(rgb.shape[0], rgb.shape[1], settings.max_image_tiles, settings.tile_size)
        resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), resample=settings.resample))
        normalize_into_tiles(np.moveaxis(resized, -1, 0), grid, table, out)
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
