"""Entry point: read flags and environment, load the model, build the page, serve it.

    python app.py                      # Llama 3.2 Vision if cached locally, else the tiny demo model
    python app.py --model meta-llama/Llama-3.2-11B-Vision-Instruct --device-map auto
    python app.py --help               # every flag and its environment variable
"""
from __future__ import annotations

import logging
import sys


def main(argv: list[str]) -> int:
    from app.config import FlagError, parse_config

    try:
        config = parse_config(argv)
    except FlagError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from app.server import launch, load_engine, port_problem
    from app.ui import build_demo

    problem = port_problem(config)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    engine = load_engine(config)
    if engine is None:
        return 1
    launch(build_demo(engine, config), config, engine)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
