"""generate() of this checkout against generate() of another checkout, interleaved in one process.

On shared, busy cores a benchmark run moves by 2x from one minute to the next, so "before" and
"after" measured in two runs say nothing. Here both versions of `model/` load the same random
checkpoint and take turns, call by call, so that both see the same load; the table gives the
median of each and the median of the per-round ratios. The tokens of both are checked equal.

Usage: python benchmarks/bench_ab_generate.py --base /path/to/other/checkout [--preset medium]
       [--rounds 15] [--new 64] [--prompt 64] [--num-beams 1] [--sample] [--text-only]
(e.g. `git worktree add /tmp/base HEAD~3` or `git archive BASE | tar -x -C /tmp/base`).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from setups import PRESETS, build_pair, machine, make_inputs, table

HERE = Path(__file__).resolve().parent.parent


def load_package(root: Path, name: str):
    """`root/model` imported as package `name`, next to ours (its relative imports stay inside)."""
    spec = importlib.util.spec_from_file_location(name, root / "model" / "__init__.py",
                                                  submodule_search_locations=[str(root / "model")])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package


def timed(model, inputs, new: int, num_beams: int, sample: bool) -> tuple[float, torch.Tensor]:
    options = {"num_beams": num_beams} if num_beams > 1 else {}  # a base without beam search still runs greedy
    if sample:
        options.update(do_sample=True, temperature=0.8, top_p=0.9, seed=0)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0,
                             **({"do_sample": False} | options))
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True, type=Path, help="the other checkout (holds model/)")
    parser.add_argument("--preset", default="medium", choices=sorted(PRESETS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--text-only", action="store_true")
    parser.add_argument("--sample", action="store_true", help="sample (temperature 0.8, top_p 0.9, seed 0)")
    args = parser.parse_args()

    hf, _ = build_pair(args.preset)
    folder = tempfile.mkdtemp(prefix="ab_generate_")
    hf.save_pretrained(folder)
    versions = {"base": load_package(args.base.resolve(), "model_base"), "this checkout": load_package(HERE, "model_here")}
    models = {name: package.MllamaForConditionalGeneration.from_pretrained(folder, semantics="transformers")
              for name, package in versions.items()}
    inputs = make_inputs(hf.config, prompt_len=args.prompt, image=not args.text_only)
    outputs = {name: timed(model, inputs, args.new, args.num_beams, args.sample)[1] for name, model in models.items()}  # warm-up
    print(f"tokens equal: {torch.equal(*outputs.values())}")

    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(args.rounds):
        order = list(models) if round_ % 2 == 0 else list(reversed(models))
        for name in order:
            times[name].append(timed(models[name], inputs, args.new, args.num_beams, args.sample)[0])
    ratios = [b / h for b, h in zip(times["base"], times["this checkout"])]
    search = f"{args.num_beams} beams" if args.num_beams > 1 else "sampling" if args.sample else "greedy"
    print(f"generate, preset {args.preset}, {args.prompt}-token prompt, {args.new} new tokens, {search}, "
          f"{args.rounds} interleaved rounds; {machine()}")
    rows = [["version", "median time (ms)", "min time (ms)", "tokens/s (median)"]]
    for name, values in times.items():
        rows.append([name, f"{1000 * statistics.median(values):.1f}", f"{1000 * min(values):.1f}",
                     f"{args.new / statistics.median(values):.1f}"])
    print(table(rows))
    print(f"median of per-round time ratios base / this checkout: {statistics.median(ratios):.3f} "
          f"(> 1: this checkout is faster; quartiles {statistics.quantiles(ratios, n=4)[0]:.3f}-"
          f"{statistics.quantiles(ratios, n=4)[2]:.3f})")


if __name__ == "__main__":
    main()
