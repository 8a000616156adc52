"""Quality of weight-only int8 / int4 against the same weights unquantized (what tests/test_quantization.py
bounds): relative logits error and greedy agreement over 32 steps, on random configs (tests/reference.py)
with a picture and text only, several seeds; with --tiny also the shipped tiny model's behaviour
accuracy (the questions of tests/test_tiny_model.py on its 200 fresh pictures).
The measurement is tests/quantization_quality.py; float32 on the CPU.

Usage: python benchmarks/bench_quantization_quality.py [--seeds 0 1 2] [--tiny]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

from quantization_quality import INT4_VARIANTS, QUALITY_VARIANTS, STEPS, measure, write_checkpoint  # noqa: E402
from setups import table  # noqa: E402

from model import MllamaForConditionalGeneration, MllamaProcessor  # noqa: E402


def random_configs(seeds: list[int]) -> None:
    rows = [["config", "prompt", "method", "logits error (mean / max)", f"greedy agreement, {STEPS} steps (mean / min)",
             "steps before the first difference (min)"]]
    for name in QUALITY_VARIANTS:
        results: dict[tuple[str, str], list] = {}
        for seed in seeds:
            folder, prompts = write_checkpoint(name, seed, Path(tempfile.mkdtemp(prefix="quality_")))
            reference = MllamaForConditionalGeneration.from_pretrained(folder)
            for method in ("int8", "int4") if name in INT4_VARIANTS else ("int8",):
                quantized = MllamaForConditionalGeneration.from_pretrained(folder, quantization=method)
                for kind, inputs in prompts.items():
                    results.setdefault((kind, method), []).append(measure(reference, quantized, inputs))
        for (kind, method), qs in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
            errors, agreements = [q.logits_error for q in qs], [q.agreement for q in qs]
            rows.append([name, kind, method, f"{sum(errors) / len(errors):.4f} / {max(errors):.4f}",
                         f"{sum(agreements) / len(agreements):.2f} / {min(agreements):.2f}",
                         str(min(q.steps_identical for q in qs))])
    print(f"random configs, seeds {seeds}, float32, CPU")
    print(table(rows))


def tiny_model() -> None:
    from test_tiny_model import ASSET, SEED, accuracy

    from scripts import synthetic

    rng = random.Random(SEED)
    samples = [synthetic.make_sample(rng, parity=1) for _ in range(200)]
    processor = MllamaProcessor.from_pretrained(ASSET)
    tasks = ("color", "shape", "count", "describe")
    rows = [["weights", *tasks]]
    for method in (None, "int8", "int4"):
        model = MllamaForConditionalGeneration.from_pretrained(ASSET, quantization=method)
        rows.append([method or "float32", *(f"{accuracy((model, processor), samples, t)[0]:.1%}" for t in tasks)])
    print("assets/tiny-mllama, answers right on 200 fresh pictures")
    print(table(rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tiny", action="store_true", help="also the tiny model's behaviour accuracy (minutes)")
    args = parser.parse_args()
    random_configs(args.seeds)
    if args.tiny:
        tiny_model()


if __name__ == "__main__":
    main()
