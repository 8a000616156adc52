"""Images per second: our MllamaImageProcessor (PIL) and MllamaImageProcessorFast (torch) against
transformers' MllamaImageProcessor (PIL backend, the one used without torchvision), same images.

Usage: python benchmarks/bench_image_processing.py [--repeats N] [--threads T] [--device cpu|cuda]
Prints a markdown table (paste it into benchmarks/RESULTS.md, section "Image processing").
Each figure is the best of `--repeats` timed rounds (the machine is shared; the best round is the
least disturbed one). Inputs are decoded PIL images, so file decoding is not measured.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.image_processing import MllamaImageProcessor  # noqa: E402
from model.image_processing_fast import MllamaImageProcessorFast  # noqa: E402

HUB_SETTINGS = dict(do_convert_rgb=True, do_normalize=True, do_pad=True, do_rescale=True, do_resize=True,
                    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
                    max_image_tiles=4, resample=2, rescale_factor=1 / 255, size={"height": 560, "width": 560})


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB picture: smooth colour gradients, a few shapes and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * min(width, height)
        base[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    base += rng.normal(0, 6, base.shape).astype(np.float32)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def images_per_second(process: Callable[[Any], Any], images: Any, count: int, repeats: int,
                      sync: Callable[[], None]) -> float:
    process(images)  # warm-up: caches, thread pools, lazy imports
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        process(images)
        sync()
        best = min(best, time.perf_counter() - start)
    return count / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="device of the fast processor")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    reference = MllamaImageProcessorPil(**HUB_SETTINGS)
    ours = MllamaImageProcessor(**HUB_SETTINGS)
    fast = MllamaImageProcessorFast(device=args.device, **HUB_SETTINGS)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    no_sync = lambda: None  # noqa: E731

    workloads = {"4000x3000 photo": [photo(4000, 3000)], "640x480 photo": [photo(640, 480)],
                 "8 x 640x480, one call": [photo(640, 480, seed) for seed in range(8)]}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
          f", fast processor on {args.device}, best of {args.repeats}\n")
    print("| images | transformers PIL (img/s) | ours PIL (img/s) | ours fast (img/s) | PIL / ref | fast / ref |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, images in workloads.items():
        batch = images if len(images) > 1 else images[0]
        ref = images_per_second(lambda im: reference(im, return_tensors="pt"), batch, len(images), args.repeats,
                                no_sync)
        slow = images_per_second(lambda im: ours(im, return_tensors="pt"), batch, len(images), args.repeats, no_sync)
        quick = images_per_second(lambda im: fast(im, return_tensors="pt"), batch, len(images), args.repeats, sync)
        print(f"| {name} | {ref:.1f} | {slow:.1f} | {quick:.1f} | {slow / ref:.2f}x | {quick / ref:.2f}x |")


if __name__ == "__main__":
    main()
