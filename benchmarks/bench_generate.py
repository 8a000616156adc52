"""generate(): ours against transformers on identical random weights and inputs, in one run.

Prints time to first token, decode tokens/s and peak memory, with ratios. Batch 1, one 4-tile
image (or text only with --text-only), greedy, a fixed number of new tokens.
On a GPU the models run in bfloat16 and peak memory is torch.cuda.max_memory_allocated; on the
CPU in float32 and peak memory is the largest rise of the process's resident memory during the
call (sampled every 2 ms).

`--num-beams 4` measures beam search instead of greedy decoding (the same on both sides).

Usage: python benchmarks/bench_generate.py [--preset medium|11b] [--new 64] [--prompt 64] [--text-only] [--no-compile]
       [--num-beams 1]
"""
from __future__ import annotations

import argparse
import threading
import time

import psutil
import torch

from setups import best_of, build_pair, machine, make_inputs, table


class PeakMemory:
    """Peak extra memory (bytes) while the block runs."""

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.process, self.done = psutil.Process(), threading.Event()
            self.base = self.peak = self.process.memory_info().rss
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self.done.set()
            self.thread.join()
            self.extra = self.peak - self.base


def run(model, inputs, new: int, **options) -> None:
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0, **options)
    assert out.shape[1] == inputs["input_ids"].shape[1] + new


def measure(model, inputs, new: int, repeats: int, **options) -> dict:
    run(model, inputs, new, **options)  # warm-up (and compilation, if asked for)
    ttft = best_of(lambda: run(model, inputs, 1, **options), repeats)
    total = best_of(lambda: run(model, inputs, new, **options), max(1, repeats // 2))
    with PeakMemory() as memory:
        run(model, inputs, new, **options)
    return {"ttft": ttft, "decode_tok_s": (new - 1) / (total - ttft), "peak": memory.extra}


def describe_graphs(model) -> str:
    """What the compiled rows ran: CUDA graphs replayed, or the compiled step without them."""
    kinds = [type(g).__name__ for c in getattr(model, "_decode_caches", {}).values() for g in c.decode_graphs.values()]
    return f"CUDA graphs: {', '.join(kinds)}" if kinds else "no CUDA graphs (compiled step only)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text-only", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled-decode row")
    parser.add_argument("--num-beams", type=int, default=1)
    args = parser.parse_args()
    beams = {"num_beams": args.num_beams}
    hf, ours = build_pair(args.preset)
    inputs = make_inputs(ours.config, prompt_len=args.prompt, image=not args.text_only)
    with torch.inference_mode():  # same greedy tokens, or the comparison is meaningless
        a = hf.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0, **beams)
        b = ours.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None, **beams)
    print(f"{'greedy' if args.num_beams == 1 else 'beam search'} tokens equal: {torch.equal(a, b)}")
    results = {"transformers": measure(hf, inputs, args.new, args.repeats, **beams),
               "ours (eager)": measure(ours, inputs, args.new, args.repeats, compile=False, **beams)}
    if not args.no_compile:
        results["ours (compiled decode)"] = measure(ours, inputs, args.new, args.repeats, compile=True, **beams)
        print(f"compiled decode: {describe_graphs(ours)}")
    what = "text only" if args.text_only else "one 4-tile image"
    search = "greedy" if args.num_beams == 1 else f"{args.num_beams} beams"
    print(f"generate, preset {args.preset}, batch 1, {what}, prompt {args.prompt}, {args.new} new tokens, {search}; "
          f"{machine()}")
    base = results["transformers"]
    rows = [["implementation", "time to first token (ms)", "decode tokens/s", "peak extra memory (MiB)",
             "TTFT ratio", "decode ratio"]]
    for name, r in results.items():
        rows.append([name, f"{1000 * r['ttft']:.1f}", f"{r['decode_tok_s']:.1f}", f"{r['peak'] / 1024 ** 2:.0f}",
                     f"{base['ttft'] / r['ttft']:.2f}x", f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x"])
    print(table(rows))
    print("ratios: > 1 means ours is faster than transformers")


if __name__ == "__main__":
    main()
