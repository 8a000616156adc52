"""Startup to first answer: `python app.py` in a fresh process until `/ask` has answered.

    python benchmarks/bench_app_startup.py [--model assets/tiny-mllama] [--runs 3]

Prints, per run, the seconds from starting the process to (1) the page answering HTTP and (2) the
first complete answer of `/ask` about a small synthetic picture (greedy, as a user would see it).
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from gradio_client import Client, handle_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.synthetic import draw_picture  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_page(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode} before serving the page")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"no page at {url} after {timeout_s} s")


def one_run(model: str | None, picture: str) -> tuple[float, float, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port)] + (["--model", model] if model else [])
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        wait_for_page(url, process, timeout_s=600)
        page_s = time.perf_counter() - start
        client = Client(url, verbose=False)
        answer = client.predict(image=handle_file(picture), question="What color is the shape?", temperature=0,
                                api_name="/ask")
        answer_s = time.perf_counter() - start
        client.close()
        return page_s, answer_s, answer
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="passed to app.py --model (default: app.py's default)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        picture = str(Path(folder) / "red.png")
        draw_picture(random.Random(0), "red", "circle", 1, (301, 227)).save(picture)
        print("| run | page served (s) | first answer (s) | answer |")
        print("|---:|---:|---:|---|")
        for run in range(1, args.runs + 1):
            page_s, answer_s, answer = one_run(args.model, picture)
            print(f"| {run} | {page_s:.1f} | {answer_s:.1f} | {answer!r} |", flush=True)


if __name__ == "__main__":
    main()
