"""Continuous batching: aggregate tokens/s with N requests at once against the same N requests
served one after another, through the engine's scheduler (the code path the app uses).

Each request: a prompt of 64 tokens with one 4-tile image (a different random picture each),
greedy, a fixed number of new tokens. Aggregate tokens/s = all new tokens / wall time, prefills
included. Sequential = the same requests submitted one at a time to the same engine.
Batched decode tokens/s = the tokens after each request's first / the time from the last first
token to the last reply's end: the decode batch alone, all requests in it. TTFT all at once = the
mean and the longest time from submitting to the first token when all N arrive at once (medians
over --repeats runs; the batched figures are those of the fastest run). Last, how long a cancelled request takes to leave:
from setting its cancel flag (Stop, a closed tab) to the end of its stream, alone and among N.

--compile runs the engine's fixed-shape decode (torch.compile; CUDA graphs on a GPU), as the app
does with --compile; every bucket is compiled and captured while the engine loads.

Usage: python benchmarks/bench_concurrency.py [--preset medium|11b] [--new 64] [--levels 1,2,4,8,16] [--repeats 3] [--compile]
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time


from setups import build_pair, machine, make_inputs, sync, table

from model.sampling import SamplingConfig  # noqa: E402
from serving.policy import Request  # noqa: E402
from serving.runner import ModelRunner  # noqa: E402
from serving.scheduler import Scheduler  # noqa: E402


class Sink:
    """Stands in for a streamer: counts tokens and signals the end."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.started = threading.Event()  # a few tokens are out
        self.error = None
        self.first = self.last = None
        self.count = 0

    def put(self, value) -> None:
        if self.first is None:  # the scheduler has already read the token back: no sync needed
            self.first = time.perf_counter()
        self.count += 1
        if self.count == 3:
            self.started.set()

    def end(self) -> None:
        self.last = time.perf_counter()
        self.done.set()

    def put_error(self, exc) -> None:
        self.error = exc
        self.done.set()


def request(config, seed: int, new: int) -> Request:
    inputs = make_inputs(config, prompt_len=64, seed=seed)
    inputs.pop("attention_mask")
    return Request(prompt_ids=inputs["input_ids"][0].tolist(), inputs=inputs, sampling=SamplingConfig(),
                   max_new_tokens=new, eos=frozenset(), streamer=Sink())


def ttft(requests: list[Request]) -> tuple[float, float]:
    """Mean and longest time to first token."""
    waits = [r.first_token_at - r.submitted for r in requests]
    return sum(waits) / len(waits), max(waits)


def decode_rate(requests: list[Request]) -> float:
    """Tokens after the first ones per second, from the last first token to the last end."""
    start = max(r.streamer.first for r in requests)
    end = max(r.streamer.last for r in requests)
    return sum(len(r.tokens) - 1 for r in requests) / (end - start)


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
    parser.add_argument("--repeats", type=int, default=3, help="runs of the simultaneous arrivals per level")
    parser.add_argument("--compile", action="store_true", help="fixed-shape decode: torch.compile (+ CUDA graphs)")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    _, ours = build_pair(args.preset)
    del _
    runner = ModelRunner(ours, max(levels), 64 + args.new + 8, compile=args.compile)
    if runner.static:
        runner.warm_up()  # compiles (and captures) every bucket, as the engine does while loading
    scheduler = Scheduler(runner, max(levels), queue_size=max(levels) + 1)
    for n in sorted({1, *levels}):  # warm-up: every batch size
        serve(scheduler, [request(ours.config, i, 4) for i in range(n)], together=True)
    graphs = {n: type(g).__name__ for n, g in sorted(runner.cache.decode_graphs.items())}
    print(f"decode graphs per bucket: {graphs or 'none'}", flush=True)
    rows = [["concurrent requests", "sequential tok/s", "batched tok/s", "speed-up", "batched decode tok/s",
             "TTFT s all at once: mean", "last"]]
    for n in levels:
        seq = serve(scheduler, [request(ours.config, i, args.new) for i in range(n)], together=False)
        bat, batch = float("inf"), []
        waits = []
        for _ in range(args.repeats):  # this machine's speed drifts: the best run, the median waits
            run = [request(ours.config, i, args.new) for i in range(n)]
            elapsed = serve(scheduler, run, together=True)
            waits.append(ttft(run))
            if elapsed < bat:
                bat, batch = elapsed, run
        tokens = n * args.new
        mean_wait, last_wait = (statistics.median(w[i] for w in waits) for i in (0, 1))
        rows.append([str(n), f"{tokens / seq:.1f}", f"{tokens / bat:.1f}", f"{seq / bat:.2f}x", f"{decode_rate(batch):.1f}",
                     f"{mean_wait:.3f}", f"{last_wait:.3f}"])
        print(rows[-1], flush=True)
    cancel_rows = [["requests running", "cancel to end of stream s"]]
    for n in (1, max(levels)):
        batch = [request(ours.config, i, args.new) for i in range(n)]
        for r in batch:
            scheduler.submit(r)
        batch[0].streamer.started.wait()
        cancelled = time.perf_counter()
        batch[0].cancel.set()
        batch[0].streamer.done.wait()
        cancel_rows.append([str(n), f"{time.perf_counter() - cancelled:.3f}"])
        for r in batch:
            r.cancel.set()
            r.streamer.done.wait()
    scheduler.close()
    mode = "compiled fixed-shape decode" if args.compile else "eager decode"
    print(f"continuous batching ({mode}), preset {args.preset}, {args.new} new tokens per request, one 4-tile image each; {machine()}")
    print(table(rows))
    print(table(cancel_rows))


if __name__ == "__main__":
    main()
