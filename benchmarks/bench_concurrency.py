"""Continuous batching: aggregate tokens/s with N requests at once against the same N requests
served one after another, through the engine's scheduler (the code path the app uses).

Each request: a prompt of 64 tokens with one 4-tile image (a different random picture each),
greedy, a fixed number of new tokens. Aggregate tokens/s = all new tokens / wall time, prefills
included. Sequential = the same requests submitted one at a time to the same engine.

Usage: python benchmarks/bench_concurrency.py [--preset medium|11b] [--new 64] [--levels 1,2,4,8,16]
"""
from __future__ import annotations

import argparse
import threading
import time

import torch

from setups import build_pair, machine, make_inputs, sync, table

from model.sampling import SamplingConfig  # noqa: E402
from model.scheduler import Request, Scheduler  # noqa: E402


class Sink:
    """Stands in for a streamer: counts tokens and signals the end."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error = None

    def put(self, value) -> None:
        pass

    def end(self) -> None:
        self.done.set()

    def put_error(self, exc) -> None:
        self.error = exc
        self.done.set()


def request(config, seed: int, new: int) -> Request:
    inputs = make_inputs(config, prompt_len=64, seed=seed)
    inputs.pop("attention_mask")
    return Request(inputs=inputs, sampling=SamplingConfig(), max_new_tokens=new, eos=[], streamer=Sink())


def serve(scheduler: Scheduler, requests: list[Request], together: bool) -> float:
    sync()
    start = time.perf_counter()
    if together:
        for r in requests:
            scheduler.submit(r)
    for r in requests:
        if not together:
            scheduler.submit(r)
        r.streamer.done.wait()
        if r.streamer.error:
            raise r.streamer.error
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--levels", default="1,2,4,8,16")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    _, ours = build_pair(args.preset)
    del _
    scheduler = Scheduler(ours, max_batch=max(levels), capacity=64 + args.new + 8, queue_size=max(levels) + 1)
    serve(scheduler, [request(ours.config, 0, 4)], together=True)  # warm-up
    rows = [["concurrent requests", "sequential tok/s", "batched tok/s", "speed-up"]]
    for n in levels:
        seq = serve(scheduler, [request(ours.config, i, args.new) for i in range(n)], together=False)
        bat = serve(scheduler, [request(ours.config, i, args.new) for i in range(n)], together=True)
        tokens = n * args.new
        rows.append([str(n), f"{tokens / seq:.1f}", f"{tokens / bat:.1f}", f"{seq / bat:.2f}x"])
        print(rows[-1], flush=True)
    scheduler.close()
    print(f"continuous batching, preset {args.preset}, {args.new} new tokens per request, one 4-tile image each; {machine()}")
    print(table(rows))


if __name__ == "__main__":
    main()
