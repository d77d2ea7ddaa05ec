"""The synthetic visual question-answering set of the demo model (a tiny CLEVR + TextVQA).

Two kinds of 448x448 pictures, one tile each, laid out on the 16x16 grid of 28x28 cells that
become the LLM's image tokens, so that a small model trained for minutes on a CPU can read them
cell by cell:
- shapes: a 2x2 grid of quadrants, each empty or holding one filled shape (circle, square,
  triangle, star) in one of 6 colours, all of one size, covering a 2x2 block of cells somewhere in
  its quadrant;
- text: a word (from WORDS, each with its own first letter) in capitals in the top half and a
  number (10-99) in the bottom half, in one colour, one character per cell, from column 2.

Eight kinds of questions, each with a short exact answer:

    colour    What colour is the circle?       red        (the shape appears once)
    shape     Which shape is blue?             triangle   (the colour appears once)
    count     How many squares are there?      3
    total     How many shapes are there?       4
    where     Where is the star?               top left   (the shape appears once)
    word      What word is written?            moon
    number    What number is written?          47
    ink       What colour is the text?         green

`example(rng, kind)` draws a picture made for a question of that kind and returns every question
the picture answers; `questions(seed, n)` is a balanced evaluation set (kinds in turn).
Besides the picture, `example` returns per-cell labels (one LLM image token per cell), which
training uses as an auxiliary loss: a cell of a shape is labelled with its colour, shape and
quadrant; a text cell with its colour, and the word's first-letter cell with the word, the
number's two cells with their digits. Every label is visible inside its own cell (the column
is known from the position), so the vision encoder only has to classify cells, and the language
model only has to find the cells a question is about.
Everything is a pure function of the random generator, so a seed fixes a data set.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 448
GRID = 16                      # LLM image tokens per side of a tile (32x32 patches, pixel-shuffled)
CELL = SIZE // GRID
RADIUS = 26                    # every shape fills a 2x2 block of cells

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
           "yellow": (235, 200, 20), "purple": (140, 50, 180), "orange": (245, 130, 20)}
SHAPES = ["circle", "square", "triangle", "star"]
QUADRANTS = ["top left", "top right", "bottom left", "bottom right"]
WORDS = ["bird", "cat", "dog", "egg", "fish", "hat", "kite", "lamp", "moon", "nest", "owl", "pig",
         "rain", "sun", "tree", "wolf"]
NUMBERS = [str(n) for n in range(10, 100)]
TEXT_SIZE = 30                 # capitals and digits fit in a cell
TEXT_COLUMN = 2                # the first character's cell column
# Per-cell label channels: name -> classes, 0 = none.
LABELS = {"colour": 1 + len(COLOURS), "shape": 2 + len(SHAPES), "quadrant": 1 + len(QUADRANTS),
          "word": 1 + len(WORDS), "tens": 11, "units": 11}
KINDS = ["colour", "shape", "count", "total", "where", "word", "number", "ink"]

QUESTION = {
    "colour": "What colour is the {}?",
    "shape": "Which shape is {}?",
    "count": "How many {}s are there?",
    "total": "How many shapes are there?",
    "where": "Where is the {}?",
    "word": "What word is written?",
    "number": "What number is written?",
    "ink": "What colour is the text?",
}


@dataclass
class Example:
    image: Image.Image
    qas: list              # [(kind, question, answer)], every question this picture answers
    labels: np.ndarray     # [len(LABELS), GRID, GRID] int64, see LABELS


# ---------------------------------------------------------------- drawing

def _jitter(rng: random.Random, rgb, amount=20):
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _background(rng: random.Random) -> tuple:
    base = rng.randint(225, 255)
    return tuple(max(0, min(255, base + rng.randint(-8, 8))) for _ in range(3))


def _shape_points(shape: str, cx: float, cy: float, r: float):
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (-math.pi / 2, -math.pi / 2 + 2 * math.pi / 3, -math.pi / 2 + 4 * math.pi / 3)]
    if shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    raise ValueError(shape)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill):
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r), fill=fill)


def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=TEXT_SIZE)


# ---------------------------------------------------------------- pictures

def _labels() -> dict:
    return {name: np.zeros((GRID, GRID), np.int64) for name in LABELS}


def _stack(labels: dict) -> np.ndarray:
    return np.stack([labels[name] for name in LABELS])


def _shapes_picture(rng: random.Random, objects: list) -> Example:
    """objects: (shape, colour) per quadrant, None for an empty one (exactly 4 entries)."""
    image = Image.new("RGB", (SIZE, SIZE), _background(rng))
    draw = ImageDraw.Draw(image)
    labels = _labels()
    half = GRID // 2
    for q, obj in enumerate(objects):
        if obj is None:
            continue
        shape, colour = obj
        r = (q // 2) * half + rng.randint(1, half - 3)      # the block's top-left cell
        c = (q % 2) * half + rng.randint(1, half - 3)
        _draw_shape(draw, shape, (c + 1) * CELL, (r + 1) * CELL, RADIUS, _jitter(rng, COLOURS[colour]))
        block = (slice(r, r + 2), slice(c, c + 2))
        labels["colour"][block] = 1 + list(COLOURS).index(colour)
        labels["shape"][block] = 1 + SHAPES.index(shape)
        labels["quadrant"][block] = 1 + q
    present = [o for o in objects if o is not None]
    shape_count = {s: sum(1 for o in present if o[0] == s) for s in SHAPES}
    colour_count = {c: sum(1 for o in present if o[1] == c) for c in COLOURS}
    qas = [("total", QUESTION["total"], str(len(present)))]
    for q, obj in enumerate(objects):
        if obj is None:
            continue
        shape, colour = obj
        if shape_count[shape] == 1:
            qas.append(("colour", QUESTION["colour"].format(shape), colour))
            qas.append(("where", QUESTION["where"].format(shape), QUADRANTS[q]))
        if colour_count[colour] == 1:
            qas.append(("shape", QUESTION["shape"].format(colour), shape))
    for s in SHAPES:
        if shape_count[s]:
            qas.append(("count", QUESTION["count"].format(s), str(shape_count[s])))
    return Example(image, qas, _stack(labels))


def _text_picture(rng: random.Random) -> Example:
    """A word in the top half and a number in the bottom half, in one colour, a character per cell."""
    image = Image.new("RGB", (SIZE, SIZE), _background(rng))
    colour = rng.choice(list(COLOURS))
    fill = _jitter(rng, COLOURS[colour])
    word, number = rng.choice(WORDS), rng.choice(NUMBERS)
    draw = ImageDraw.Draw(image)
    font = _font()
    labels = _labels()
    half = GRID // 2
    for k, text in enumerate([word.upper(), number]):
        row = k * half + rng.randint(1, half - 2)
        for i, ch in enumerate(text):
            col = TEXT_COLUMN + i
            left, top, right, bottom = font.getbbox(ch, stroke_width=1)
            x = col * CELL + (CELL - (right - left)) / 2 - left + rng.uniform(-1.5, 1.5)
            y = row * CELL + (CELL - (bottom - top)) / 2 - top + rng.uniform(-1.5, 1.5)
            draw.text((x, y), ch, font=font, fill=fill, stroke_width=1, stroke_fill=fill)
            labels["colour"][row, col] = 1 + list(COLOURS).index(colour)
            labels["shape"][row, col] = 1 + len(SHAPES)
        if k == 0:
            labels["word"][row, TEXT_COLUMN] = 1 + WORDS.index(word)
        else:
            labels["tens"][row, TEXT_COLUMN] = 1 + int(number[0])
            labels["units"][row, TEXT_COLUMN + 1] = 1 + int(number[1])
    qas = [("word", QUESTION["word"], word), ("number", QUESTION["number"], number), ("ink", QUESTION["ink"], colour)]
    return Example(image, qas, _stack(labels))


def example(rng: random.Random, kind: str) -> Example:
    """A picture drawn so that a question of `kind` applies, with every question it answers."""
    if kind in ("word", "number", "ink"):
        return _text_picture(rng)
    quadrants = list(range(4))
    rng.shuffle(quadrants)
    if kind == "count":
        target = rng.choice(SHAPES)
        k = rng.randint(1, 4)
        n = rng.randint(k, 4)
        shapes = [target] * k + [rng.choice([s for s in SHAPES if s != target]) for _ in range(n - k)]
    else:
        n = rng.randint(1, 4)
        # Mostly distinct shapes and colours, so that unique-object questions apply.
        shapes = rng.sample(SHAPES, n) if rng.random() < 0.8 else [rng.choice(SHAPES) for _ in range(n)]
    colours = rng.sample(list(COLOURS), n) if rng.random() < 0.7 else [rng.choice(list(COLOURS)) for _ in range(n)]
    objects = [None] * 4
    for q, s, c in zip(quadrants, shapes, colours):
        objects[q] = (s, c)
    ex = _shapes_picture(rng, objects)
    if not any(k == kind for k, _, _ in ex.qas):
        return example(rng, kind)     # e.g. no unique colour: draw again
    return ex


def training_example(rng: random.Random) -> Example:
    return example(rng, rng.choice(KINDS))


def questions(seed: int, n: int) -> list:
    """A balanced evaluation set: n questions (kinds in turn, one per picture) as (image, question, answer, kind)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        ex = example(rng, kind)
        _, q, a = rng.choice([qa for qa in ex.qas if qa[0] == kind])
        out.append((ex.image, q, a, kind))
    return out


def demo_picture() -> tuple:
    """The picture, question and answer `make demo` uses (models/internvl-demo/demo.png, demo.json)."""
    objects = [("star", "yellow"), ("circle", "red"), None, ("triangle", "blue")]
    return _shapes_picture(random.Random(7), objects).image, QUESTION["colour"].format("star"), "yellow"


def corpus() -> list:
    """Every question and answer text, for training the tokenizer."""
    texts = [QUESTION["total"], QUESTION["word"], QUESTION["number"], QUESTION["ink"]]
    texts += [QUESTION[k].format(s) for k in ("colour", "count", "where") for s in SHAPES]
    texts += [QUESTION["shape"].format(c) for c in COLOURS]
    texts += list(COLOURS) + SHAPES + QUADRANTS + WORDS + NUMBERS + [str(i) for i in range(1, 5)]
    return texts
