"""Weight-only quantization: memory and speed of our model in int8 and int4 against unquantized,
on one bfloat16 checkpoint of random weights with a preset's shapes, in one run.

Each row loads the checkpoint in a fresh process (so its peak memory is its own) and reports:
the bytes its weights take, peak memory while loading, then generate() at batch 1 (one 4-tile
picture, or text only): time to first token, decode tokens/s, and peak memory while serving.
On a GPU (bfloat16): peak memory is torch.cuda.max_memory_allocated (loading, and in total while
generating: weights + cache + activations; the host's peak RSS growth while loading is shown
too). On the CPU (float32): peak RSS growth of the process while loading, and over the whole run.

Usage: python benchmarks/bench_quantization.py [--preset medium|11b] [--prompt 64] [--new 32]
           [--text-only] [--compile] [--folder DIR] [--budget-gib 12]
The 11B question ("does int4 fit in 12 GB with an 8k-token cache?"), on a GPU:
    python benchmarks/bench_quantization.py --preset 11b --text-only --prompt 8000 --new 192 --compile
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from bench_loading import write_checkpoint
from setups import machine, table

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CHILD = """
import json, resource, sys, time
sys.path[:0] = [{root!r}, {here!r}]
import torch
from bench_generate import measure
from setups import device_and_dtype, make_inputs
from model import MllamaForConditionalGeneration
from model.quantization import quiet_torchao_import, stored_bytes

quiet_torchao_import()  # before the baseline: every row pays for the import alike

def rss_mib():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024

device, dtype = device_and_dtype()
gpu = device == "cuda"
base = rss_mib()
start = time.perf_counter()
model = MllamaForConditionalGeneration.from_pretrained({folder!r}, dtype=dtype, quantization={quantization!r},
                                                       device_map=device if gpu else None)
if gpu:
    torch.cuda.synchronize()
load_s = time.perf_counter() - start
out = dict(load_s=load_s, weights=stored_bytes(model) / 2**20,
           load_host=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)
if gpu:
    out["load_gpu"] = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
inputs = make_inputs(model.config, prompt_len={prompt}, image={image})
r = measure(model, inputs, {new}, {repeats}, compile={compile})
out.update(ttft_ms=1000 * r["ttft"], decode_tok_s=r["decode_tok_s"],
           run_host=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)
if gpu:
    out["serve_gpu"] = torch.cuda.max_memory_allocated() / 2**20
print(json.dumps(out))
"""


def run_child(folder: str, quantization: str | None, args) -> dict:
    code = CHILD.format(root=ROOT, here=HERE, folder=folder, quantization=quantization, prompt=args.prompt,
                        image=not args.text_only, new=args.new, repeats=args.repeats, compile=args.compile)
    # glibc raises its mmap threshold as big buffers are freed, then keeps later ones in a heap that
    # the small quantized tensors fragment: RSS would count freed full-precision buffers. A fixed
    # threshold gives them back, so the figure is what loading really holds (same for every row).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text-only", action="store_true")
    parser.add_argument("--compile", action="store_true", help="decode through torch.compile (CUDA graphs on a GPU)")
    parser.add_argument("--shard", default="2GB")
    parser.add_argument("--folder", help="reuse (or create) the checkpoint here instead of a temp folder")
    parser.add_argument("--budget-gib", type=float, default=12.0, help="GPU memory to check the peak against")
    args = parser.parse_args()
    folder = args.folder or tempfile.mkdtemp(prefix="bench_quantization_")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        write_checkpoint(args.preset, folder, args.shard)
    results = {q or "none (checkpoint dtype)": run_child(folder, q, args) for q in (None, "int8", "int4")}
    gpu = any("load_gpu" in r for r in results.values())
    what = "text only" if args.text_only else "one 4-tile image"
    print(f"quantization, preset {args.preset}, batch 1, {what}, prompt {args.prompt}, {args.new} new tokens, "
          f"{'compiled' if args.compile else 'eager'} decode; {machine()}")
    head = ["weights", "weights (MiB)", "load (s)", "load peak host (MiB)"]
    head += ["load peak GPU (MiB)", "serving peak GPU (MiB)"] if gpu else []
    head += ["TTFT (ms)", "decode tok/s", "decode ratio", "peak host, whole run (MiB)"]
    rows = [head]
    base = results["none (checkpoint dtype)"]
    for name, r in results.items():
        if "error" in r:
            rows.append([name, r["error"][:100]] + [""] * (len(head) - 2))
            continue
        row = [name, f"{r['weights']:.0f}", f"{r['load_s']:.2f}", f"{r['load_host']:.0f}"]
        row += [f"{r['load_gpu']:.0f}", f"{r['serve_gpu']:.0f}"] if gpu else []
        ratio = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if "decode_tok_s" in base else ""
        row += [f"{r['ttft_ms']:.1f}", f"{r['decode_tok_s']:.1f}", ratio, f"{r['run_host']:.0f}"]
        rows.append(row)
    print(table(rows))
    if gpu:
        for name, r in results.items():
            if "serve_gpu" in r:
                fits = r["serve_gpu"] <= args.budget_gib * 1024
                print(f"{name}: peak GPU memory {r['serve_gpu'] / 1024:.1f} GiB while serving "
                      f"{args.prompt + args.new} tokens: {'fits' if fits else 'does not fit'} in {args.budget_gib:g} GiB")


if __name__ == "__main__":
    main()
