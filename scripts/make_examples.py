"""Write assets/examples/: a few synthetic pictures and the questions the UI suggests for them.

    python scripts/make_examples.py [OUT_DIR]

examples.json is a list of {"image", "question", "answer"}; the app reads image and question,
tests/test_tiny_model.py checks that tiny-mllama gives the answer.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts import synthetic  # noqa: E402

# (colour, shape, count, canvas size, task)
PICTURES = (
    ("red", "circle", 1, (300, 200), "color"),
    ("blue", "square", 2, (256, 256), "count"),
    ("green", "triangle", 3, (480, 160), "describe"),
    ("purple", "triangle", 1, (200, 320), "shape"),
    ("orange", "circle", 2, (640, 400), "color"),
    ("yellow", "square", 3, (128, 128), "count"),
)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, (color, shape, count, size, task) in enumerate(PICTURES):
        image = synthetic.draw_picture(random.Random(index), color, shape, count, size)
        name = f"{count}_{color}_{shape}{'s' if count > 1 else ''}.png"
        image.save(out / name)
        entries.append({"image": name, "question": synthetic.question(task, count),
                        "answer": synthetic.answer(task, color, shape, count)})
    (out / "examples.json").write_text(json.dumps(entries, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "assets" / "examples")
