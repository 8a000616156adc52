"""Checkpoint loading: time and peak host memory of `from_pretrained`, ours against transformers, on
one sharded bfloat16 checkpoint (random weights of a preset, written by our save_pretrained). Each
load runs in a fresh process so that its peak RSS is its own. The point to check: loading never
holds a second full copy of the weights (peak above the loaded model stays about one shard).

Usage: python benchmarks/bench_loading.py [--preset medium|11b] [--shard 50MB] [--folder DIR] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

from setups import PRESETS, machine, table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a child process: load, then report seconds, weight MiB and peak RSS growth. Weights that keep
# the checkpoint's dtype stay memory-mapped from the file (safetensors), so pages not yet touched do not
# count: the growth can be below the weights' size.
CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
from model import MllamaForConditionalGeneration as Ours
from transformers import MllamaForConditionalGeneration as Theirs
def rss_mib():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
cls = Ours if {impl!r} == "ours" else Theirs
base = rss_mib()
start = time.perf_counter()
model = cls.from_pretrained({folder!r}, dtype=getattr(torch, {dtype!r}))
seconds = time.perf_counter() - start
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(dict(seconds=seconds, weights=weights, growth=peak - base)))
"""


def write_checkpoint(preset: str, folder: str, shard: str) -> None:
    from model import MllamaConfig, MllamaForConditionalGeneration

    spec = PRESETS[preset]
    config = MllamaConfig.from_dict(
        {"vision_config": spec["vision"], "text_config": spec["text"], "image_token_index": spec["image_token"]}
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    MllamaForConditionalGeneration(config).save_pretrained(folder, max_shard_size=shard)
    torch.set_default_dtype(torch.float32)


def load_in_child(impl: str, folder: str, dtype: str) -> dict:
    code = CHILD.format(root=ROOT, impl=impl, folder=folder, dtype=dtype)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--shard", default="50MB")
    parser.add_argument("--folder", help="reuse (or create) the checkpoint here instead of a temp folder")
    parser.add_argument("--repeats", type=int, default=3, help="loads per row; the fastest is shown")
    args = parser.parse_args()
    folder = args.folder or tempfile.mkdtemp(prefix="bench_loading_")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        write_checkpoint(args.preset, folder, args.shard)
    rows = [["implementation", "dtype", "load (s)", "weights (MiB)", "peak RSS growth (MiB)"]]
    for dtype in ("bfloat16", "float32"):
        for impl in ("transformers", "ours"):
            r = min((load_in_child(impl, folder, dtype) for _ in range(args.repeats)), key=lambda r: r["seconds"])
            rows.append([impl, dtype, f"{r['seconds']:.2f}", f"{r['weights']:.0f}", f"{r['growth']:.0f}"])
    print(f"from_pretrained, preset {args.preset}, bfloat16 checkpoint in {args.shard} shards; {machine()}")
    print(table(rows))


if __name__ == "__main__":
    main()
