"""Synthetic pictures for the tiny Mllama: 1 to 3 solid shapes of one colour on a light background.

Everything is a plain function of a `random.Random`, so a seed fixes the pictures, the questions
and the answers. `make_sample(rng)` returns a `Sample`: the PIL image, its labels and Q/A pairs.

All shapes in one picture share the same kind and colour, so "What shape is this?" and
"Describe the image." have a single right answer ("Two red circles.").
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
TASKS = ("color", "shape", "count", "describe")

MIN_SIDE, MAX_SIDE, MAX_ASPECT = 64, 1024, 3.0
MIN_FRACTION, MAX_FRACTION = 0.10, 0.40  # shape size relative to the canvas's shorter side

# The canonical phrasings come first; tests and the UI use them.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": ("What color is the shape?", "What color is it?", "Which color is the shape?",
              "What is the color of the shape?", "What color do you see?"),
    "color_plural": ("What color are the shapes?", "What color are they?",
                     "Which color are the shapes?", "What is the color of the shapes?",
                     "What color do you see?"),
    "shape": ("What shape is this?", "What shape is it?", "Which shape is shown?",
              "What kind of shape is this?", "What shape do you see?"),
    "shape_plural": ("What shape are these?", "What shape are they?", "Which shape is shown?",
                     "What kind of shapes are these?", "What shape do you see?"),
    "count": ("How many shapes are there?", "How many shapes are in the picture?",
              "How many shapes do you see?", "Count the shapes.", "How many are there?"),
    "describe": ("Describe the image.", "Describe this image.", "What is in the picture?",
                 "What do you see?", "Describe the picture."),
}


@dataclass
class Sample:
    image: Image.Image
    color: str
    shape: str
    count: int
    qa: list[tuple[str, str]] = field(default_factory=list)  # (question, answer), one per task

    @property
    def description(self) -> str:
        return describe(self.color, self.shape, self.count)


def describe(color: str, shape: str, count: int) -> str:
    """The answer to "Describe the image.": "One red circle." / "Two red circles." """
    noun = shape if count == 1 else shape + "s"
    return f"{COUNT_WORDS[count].capitalize()} {color} {noun}."


def answer(task: str, color: str, shape: str, count: int) -> str:
    if task == "color":
        return color.capitalize() + "."
    if task == "shape":
        return shape.capitalize() + "."
    if task == "count":
        return COUNT_WORDS[count].capitalize() + "."
    if task == "describe":
        return describe(color, shape, count)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def question(task: str, count: int, rng: random.Random | None = None) -> str:
    """A question for `task`; the canonical phrasing without `rng`, a varied one with it."""
    key = f"{task}_plural" if task in ("color", "shape") and count > 1 else task
    if rng is None:
        return QUESTIONS[key][0]
    text = rng.choice(QUESTIONS[key])
    # Small surface variations users make: British spelling, case, missing punctuation.
    if rng.random() < 0.3:
        text = text.replace("color", "colour")
    roll = rng.random()
    if roll < 0.15:
        text = text.lower()
    elif roll < 0.2:
        text = text.upper()
    if rng.random() < 0.2:
        text = text.rstrip("?.")
    return text


def canvas_size(rng: random.Random, parity: int | None = None) -> tuple[int, int]:
    """(width, height) with both sides in [64, 1024] and aspect ratio up to 3:1.

    `parity` 0 or 1 forces both sides even or odd, so two sets of pictures can be kept from
    ever sharing an exact canvas size (training uses even sides, evaluation odd ones).
    """
    long_side = rng.randint(MIN_SIDE, MAX_SIDE)
    max_aspect = min(MAX_ASPECT, long_side / MIN_SIDE)
    aspect = math.exp(rng.uniform(0.0, math.log(max_aspect)))
    short_side = max(MIN_SIDE, round(long_side / aspect))
    if parity is not None:
        long_side = _with_parity(long_side, parity)
        short_side = _with_parity(short_side, parity)
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _with_parity(side: int, parity: int) -> int:
    if side % 2 == parity:
        return side
    return side + 1 if side + 1 <= MAX_SIDE else side - 1


def _place(rng: random.Random, width: int, height: int, sizes: list[int]) -> list[tuple[int, int]] | None:
    """Top-left corners for non-overlapping square boxes of `sizes`, or None if they do not fit."""
    boxes: list[tuple[int, int, int]] = []
    for size in sizes:
        for _ in range(100):
            x, y = rng.randint(0, width - size), rng.randint(0, height - size)
            gap = max(2, size // 10)
            if all(x + size + gap <= bx or bx + bs + gap <= x or y + size + gap <= by or by + bs + gap <= y
                   for bx, by, bs in boxes):
                boxes.append((x, y, size))
                break
        else:
            return None
    return [(x, y) for x, y, _ in boxes]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, size: int,
                fill: tuple[int, int, int]) -> None:
    box = (x, y, x + size - 1, y + size - 1)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # upright triangle filling its box
        draw.polygon([(x + (size - 1) / 2, y), (x, y + size - 1), (x + size - 1, y + size - 1)], fill=fill)


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def draw_picture(rng: random.Random, color: str, shape: str, count: int,
                 size: tuple[int, int]) -> Image.Image:
    """A light background with `count` non-overlapping `shape`s of `color`."""
    width, height = size
    short = min(width, height)
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    fill = _jitter(COLORS[color], rng, 12)
    lo, hi = math.ceil(MIN_FRACTION * short), math.floor(MAX_FRACTION * short)
    for _ in range(200):
        sizes = [rng.randint(lo, hi) for _ in range(count)]
        corners = _place(rng, width, height, sizes)
        if corners is not None:
            break
    else:  # pragma: no cover - three 10 % shapes always fit
        raise RuntimeError(f"could not place {count} shapes on a {width}x{height} canvas")
    for (x, y), s in zip(corners, sizes):
        _draw_shape(draw, shape, x, y, s, fill)
    return image


def reencode(image: Image.Image, fmt: str, rng: random.Random) -> Image.Image:
    """The picture as it comes back from a PNG or JPEG file."""
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=rng.randint(60, 95))
    else:
        image.save(buffer, format="PNG")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def make_sample(rng: random.Random, parity: int | None = None, vary_questions: bool = True,
                color: str | None = None, shape: str | None = None, count: int | None = None,
                size: tuple[int, int] | None = None) -> Sample:
    """One picture with its labels and one Q/A pair per task (in random order).

    Labels not given are drawn from `rng`; `vary_questions=False` uses the canonical phrasings.
    """
    color = color or rng.choice(list(COLORS))
    shape = shape or rng.choice(SHAPES)
    count = count or rng.randint(1, 3)
    size = size or canvas_size(rng, parity)
    image = draw_picture(rng, color, shape, count, size)
    image = reencode(image, rng.choice(("PNG", "JPEG")), rng)
    sample = Sample(image=image, color=color, shape=shape, count=count)
    sample.qa = conversation(sample, rng if vary_questions else None)
    return sample


def conversation(sample: Sample, rng: random.Random | None = None) -> list[tuple[str, str]]:
    """One (question, answer) pair per task: canonical and in TASKS order without `rng`, else
    varied phrasings in random order."""
    tasks = list(TASKS)
    if rng is not None:
        rng.shuffle(tasks)
    return [(question(t, sample.count, rng), answer(t, sample.color, sample.shape, sample.count)) for t in tasks]
