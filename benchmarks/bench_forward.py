"""Prefill forward pass (a prompt with one 4-tile image): ours against transformers on the same
random weights, in one run. Prints a table with the ratio.

Usage: python benchmarks/bench_forward.py [--preset medium|11b] [--prompt 64] [--repeats 5]
"""
from __future__ import annotations

import argparse

import torch

from setups import best_of, build_pair, machine, make_inputs, table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    hf, ours = build_pair(args.preset)
    inputs = make_inputs(ours.config, prompt_len=args.prompt)
    with torch.inference_mode():
        want, got = hf(**inputs).logits, ours(**inputs).logits  # also a warm-up
        assert ((got.float() - want.float()).norm() / want.float().norm()) < 1e-2, "the two models disagree"
        t_hf = best_of(lambda: hf(**inputs, use_cache=False), args.repeats)
        t_ours = best_of(lambda: ours(**inputs, use_cache=False), args.repeats)
    print(f"prefill forward, preset {args.preset}, prompt {args.prompt} tokens + one 4-tile image; {machine()}")
    print(table([
        ["implementation", "forward (ms)", "speed-up"],
        ["transformers", f"{1000 * t_hf:.1f}", "1.00x"],
        ["ours", f"{1000 * t_ours:.1f}", f"{t_hf / t_ours:.2f}x"],
    ]))


if __name__ == "__main__":
    main()
