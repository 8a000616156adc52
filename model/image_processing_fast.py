"""MllamaImageProcessorFast: the same pipeline as MllamaImageProcessor in torch, batched, on any device.

Images of equal size are resized together. Normalisation is the PIL processor's lookup table on CPU
(exact) and one multiply-add per channel elsewhere (equal up to float32 rounding, < 1e-6).
The resize is torch's antialiased bilinear
(the same filter as PIL's BILINEAR): on CPU in uint8, elsewhere in float32 rounded back to uint8.
Both resize in two separable passes, each rounded to uint8 with its own fixed-point weights, so a
pixel may land up to one level apart per pass: pixel values differ from MllamaImageProcessor by at
most 2 / (255 * min(image_std)) ~ 0.030, on a few percent of the pixels.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .batch_feature import BatchFeature, convert_tensors
from .image_processing import (ImageProcessorBase, ImageProcessorSettings, aspect_ratio_ids_and_mask,
                               channels_first_arg, load_nested_images, normalize_into_tiles, plan_resize,
                               to_rgb_array)


def _to_chw_uint8(image: Any, device: torch.device, channels_first: bool | None = None) -> torch.Tensor:
    """(3, H, W) uint8 on `device`; a uint8 RGB tensor stays where it is until moved, others go via numpy."""
    if (isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
            and channels_first is not False):
        return image.to(device)
    array = to_rgb_array(image, channels_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only array from PIL: we never write into it
        return torch.from_numpy(array).to(device).permute(2, 0, 1)


def resize_uint8(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of (n, 3, H, W) uint8 to (n, 3, height, width) uint8."""
    if images.shape[-2:] == (height, width):
        return images
    if images.device.type == "cpu":  # torch's uint8 kernel: mirrors PIL's filter, fast, integer output
        return F.interpolate(images.contiguous(memory_format=torch.channels_last), size=(height, width),
                             mode="bilinear", antialias=True, align_corners=False)
    return resize_via_float(images, height, width)


def resize_via_float(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The same resize in float32 (GPUs have no uint8 kernel), rounded back to uint8."""
    x = images.float()
    if width == 1:  # torch's float antialias kernel mis-resizes to a single column; resize the transpose
        x = F.interpolate(x.transpose(2, 3), size=(1, height), mode="bilinear", antialias=True).transpose(2, 3)
    else:
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


class MllamaImageProcessorFast(ImageProcessorBase):
    """Torch image processor; `device` picks where the work runs (outputs stay there)."""

    def __init__(self, settings: ImageProcessorSettings | None = None, device: str | torch.device = "cpu",
                 **overrides: Any) -> None:
        self.device = torch.device(device)
        self._use((settings or ImageProcessorSettings()).replace(**overrides))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu",
                        **overrides: Any) -> MllamaImageProcessorFast:
        return cls(ImageProcessorSettings.from_pretrained(folder), device=device, **overrides)

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def _gain_offset(self, table: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Off CPU, level v -> v * gain + offset: the table up to float32 rounding (~1e-6)."""
        levels = torch.from_numpy(table).double()
        gain = (levels[:, 255] - levels[:, 0]).div(255).float().view(3, 1, 1).to(self.device)
        return gain, levels[:, 0].float().view(3, 1, 1).to(self.device)

    def _normalize_into_tiles(self, image: torch.Tensor, grid: tuple[int, int], out: torch.Tensor,
                              table: np.ndarray | None = None) -> None:
        """Torch version of image_processing.normalize_into_tiles: one multiply-add per channel."""
        rows, cols = grid
        tile = out.shape[-1]
        tiles = out[: rows * cols].view(rows, cols, 3, tile, tile)
        for r in range(rows):  # copy (and cast) each tile's share of the image; the rest stays 0
            for c in range(cols):
                part = image[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
                tiles[r, c, :, : part.shape[1], : part.shape[2]].copy_(part)
        gain, offset = self._gain_offset(self.settings.table() if table is None else table)
        tiles.mul_(gain).add_(offset)  # level 0 padding becomes normalised black

    @torch.no_grad()  # not inference_mode: its tensors could not be used by a model being trained
    def preprocess(self, images: Any, return_tensors: str | None = None, input_data_format: Any = None,
                   **settings: Any) -> BatchFeature:
        """As MllamaImageProcessor.preprocess; outputs are torch tensors on `device` unless return_tensors="np"."""
        call = self.call_settings(settings)
        if call.resample != Image.Resampling.BILINEAR:
            raise ValueError(f"resample={call.resample!r}: the fast processor resizes bilinearly (resample=2) only; "
                             "use MllamaImageProcessor for other filters")
        channels_first = channels_first_arg(input_data_format)
        table = call.table()
        tiles_max, tile = call.max_image_tiles, call.tile_size
        nested = load_nested_images(images)
        flat = [_to_chw_uint8(img, self.device, channels_first) for sample in nested for img in sample]
        plans = [plan_resize(img.shape[1], img.shape[2], tiles_max, tile) for img in flat]

        # Resize every group of same-size images with the same target in one call. Stacking in
        # (n, H, W, 3) keeps the channels-last layout that torch's uint8 resize kernel wants.
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (img, (new_size, _)) in enumerate(zip(flat, plans)):
            groups[(tuple(img.shape[1:]), new_size)].append(i)
        resized: list[torch.Tensor] = [None] * len(flat)  # type: ignore[list-item]
        for (_, (new_h, new_w)), members in groups.items():
            # On CPU stacking buys nothing (the kernel loops over images) and costs a copy.
            for chunk in ([[i] for i in members] if self.device.type == "cpu" else [members]):
                batch = (flat[chunk[0]][None] if len(chunk) == 1
                         else torch.stack([flat[i].permute(1, 2, 0) for i in chunk]).permute(0, 3, 1, 2))
                for i, image in zip(chunk, resize_uint8(batch, new_h, new_w)):
                    resized[i] = image

        shape = (len(nested), max(map(len, nested)), tiles_max, 3, tile, tile)
        # On CPU numpy's calloc-backed zeros cost nothing for the tiles no image fills.
        pixel_values = (torch.from_numpy(np.zeros(shape, dtype=np.float32)) if self.device.type == "cpu"
                        else torch.zeros(shape, dtype=torch.float32, device=self.device))
        i = 0
        for b, sample in enumerate(nested):
            for j in range(len(sample)):
                grid = plans[i][1]
                if self.device.type == "cpu":  # numpy's single-threaded table lookup: exact, no thread wake-ups
                    normalize_into_tiles(resized[i].numpy(), grid, table, pixel_values[b, j].numpy())
                else:
                    self._normalize_into_tiles(resized[i], grid, pixel_values[b, j], table)
                i += 1
        grids = [[plans[k][1] for k in range(start, start + len(sample))]
                 for start, sample in zip(np.cumsum([0] + [len(s) for s in nested[:-1]]), nested)]
        ids, mask = aspect_ratio_ids_and_mask(grids, tiles_max)
        data = {"pixel_values": pixel_values, "aspect_ratio_ids": torch.from_numpy(ids).to(self.device),
                "aspect_ratio_mask": torch.from_numpy(mask).to(self.device)}
        out = convert_tensors(data, return_tensors)
        out["num_tiles"] = [[rows * cols for rows, cols in sample] for sample in grids]
        return out
