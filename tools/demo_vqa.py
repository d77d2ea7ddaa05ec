"""The synthetic visual question-answering set of the demo model (a tiny CLEVR + TextVQA).

Two kinds of 448x448 pictures, one tile each:
- shapes: 1-4 filled shapes (circle, square, triangle, star) in 6 colours, one per quadrant,
  with random sizes and offsets;
- text: a word (from WORDS) and a number (10-99), written large in one of the colours, one in
  the top half and one in the bottom half.

Eight kinds of questions, each with a short exact answer:

    colour    What colour is the circle?       red        (the shape appears once)
    shape     Which shape is blue?             triangle   (the colour appears once)
    count     How many squares are there?      3
    total     How many shapes are there?       4
    where     Where is the star?               top left   (the shape appears once)
    word      What word is written?            frog
    number    What number is written?          47
    ink       What colour is the text?         green

`example(rng, kind)` draws a picture made for a question of that kind and returns every question
the picture answers; `questions(seed, n)` is a balanced evaluation set (n // 8 of each kind).
Besides the picture, `example` returns per-cell labels (16x16 cells of 28x28 pixels, one LLM image
token each: colour, shape, character and its place in the text, quadrant of the object under the
cell), which training uses as an auxiliary loss.
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

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
           "yellow": (235, 200, 20), "purple": (140, 50, 180), "orange": (245, 130, 20)}
SHAPES = ["circle", "square", "triangle", "star"]
QUADRANTS = ["top left", "top right", "bottom left", "bottom right"]
WORDS = ["cat", "dog", "sun", "tree", "book", "fish", "bird", "car", "ship", "moon", "cake", "milk",
         "rain", "frog", "lamp", "kite", "boat", "door", "hat", "key", "bell", "ball", "leaf", "rose",
         "wolf", "bear", "lion", "duck", "cup", "egg"]
NUMBERS = [str(n) for n in range(10, 100)]
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
MAX_TEXT = 4                   # characters in the longest word or number
LABEL_CLASSES = (1 + len(COLOURS), 2 + len(SHAPES), 1 + MAX_TEXT * len(CHARS), 1 + len(QUADRANTS),
                 1 + len(SHAPES) * len(COLOURS), 1 + len(SHAPES) * len(QUADRANTS))
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
    labels: np.ndarray     # [6, GRID, GRID] int64: colour (0 none, 1..6), shape (0 none, 1..4, 5 text),
                           # character (0 none, 1 + slot * 36 + CHARS.index(c)), quadrant (0 none, 1..4),
                           # shape x colour (0 none, 1 + 6 * shape + colour), shape x quadrant (0, 1 + 4 * shape + q)


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


def _cell_majority(label_img: Image.Image, min_cover: float = 0.12) -> np.ndarray:
    """[GRID, GRID]: the most common nonzero label of each cell, 0 where labels cover < min_cover."""
    a = np.asarray(label_img, dtype=np.int64).reshape(GRID, CELL, GRID, CELL).transpose(0, 2, 1, 3)
    a = a.reshape(GRID, GRID, CELL * CELL)
    n = int(a.max()) + 1
    counts = np.zeros((GRID, GRID, n), dtype=np.int64)
    for v in range(1, n):
        counts[..., v] = (a == v).sum(-1)
    best = counts.argmax(-1)
    cover = counts.sum(-1) / (CELL * CELL)
    best[cover < min_cover] = 0
    return best


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


# ---------------------------------------------------------------- pictures

def _shapes_picture(rng: random.Random, objects: list[tuple[str, str]]) -> Example:
    """objects: (shape, colour) per quadrant, None for an empty one (exactly 4 entries)."""
    image = Image.new("RGB", (SIZE, SIZE), _background(rng))
    draw = ImageDraw.Draw(image)
    colour_lab, shape_lab, quad_lab, sc_lab, sq_lab = (Image.new("L", (SIZE, SIZE)) for _ in range(5))
    dc, ds, dq, dsc, dsq = (ImageDraw.Draw(x) for x in (colour_lab, shape_lab, quad_lab, sc_lab, sq_lab))
    half = SIZE // 2
    for q, obj in enumerate(objects):
        if obj is None:
            continue
        shape, colour = obj
        r = rng.uniform(40, 80)
        x0, y0 = (q % 2) * half, (q // 2) * half
        m = r + 6
        cx, cy = rng.uniform(x0 + m, x0 + half - m), rng.uniform(y0 + m, y0 + half - m)
        _draw_shape(draw, shape, cx, cy, r, _jitter(rng, COLOURS[colour]))
        _draw_shape(dc, shape, cx, cy, r, 1 + list(COLOURS).index(colour))
        _draw_shape(ds, shape, cx, cy, r, 1 + SHAPES.index(shape))
        _draw_shape(dq, shape, cx, cy, r, 1 + q)
        _draw_shape(dsc, shape, cx, cy, r, 1 + SHAPES.index(shape) * len(COLOURS) + list(COLOURS).index(colour))
        _draw_shape(dsq, shape, cx, cy, r, 1 + SHAPES.index(shape) * len(QUADRANTS) + q)
    labels = np.stack([_cell_majority(colour_lab), _cell_majority(shape_lab), np.zeros((GRID, GRID), np.int64),
                       _cell_majority(quad_lab), _cell_majority(sc_lab), _cell_majority(sq_lab)])

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
    return Example(image, qas, labels)


def _text_picture(rng: random.Random) -> Example:
    """A word and a number in one colour, one in the top half and one in the bottom half."""
    image = Image.new("RGB", (SIZE, SIZE), _background(rng))
    colour = rng.choice(list(COLOURS))
    cid = 1 + list(COLOURS).index(colour)
    fill = _jitter(rng, COLOURS[colour])
    word, number = rng.choice(WORDS), rng.choice(NUMBERS)
    colour_lab, char_lab = Image.new("L", (SIZE, SIZE)), Image.new("L", (SIZE, SIZE))
    draw, dcol, dch = ImageDraw.Draw(image), ImageDraw.Draw(colour_lab), ImageDraw.Draw(char_lab)
    half = SIZE // 2
    for k, text in enumerate([word, number] if rng.random() < 0.5 else [number, word]):
        size = rng.randint(72, 104)
        font = _font(size)
        stroke = max(1, size // 30)
        left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
        w, h = right - left, bottom - top
        x = rng.uniform(12, SIZE - 12 - w) - left
        y = k * half + rng.uniform(8, half - 8 - h) - top
        draw.text((x, y), text, font=font, fill=fill, stroke_width=stroke, stroke_fill=fill)
        dcol.text((x, y), text, font=font, fill=cid, stroke_width=stroke, stroke_fill=cid)
        for i, ch in enumerate(text):
            v = 1 + i * len(CHARS) + CHARS.index(ch)
            dch.text((x + font.getlength(text[:i]), y), ch, font=font, fill=v, stroke_width=stroke, stroke_fill=v)
    colour_cells = _cell_majority(colour_lab, min_cover=0.05)
    shape_cells = np.where(colour_cells > 0, 1 + len(SHAPES), 0)
    zeros = np.zeros((GRID, GRID), np.int64)
    labels = np.stack([colour_cells, shape_cells, _cell_majority(char_lab, min_cover=0.05), zeros, zeros, zeros])
    qas = [("word", QUESTION["word"], word), ("number", QUESTION["number"], number), ("ink", QUESTION["ink"], colour)]
    return Example(image, qas, labels)


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


def questions(seed: int, n: int) -> list[tuple[Image.Image, str, str, str]]:
    """A balanced evaluation set: n questions (kind, one per picture) as (image, question, answer, kind)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        ex = example(rng, kind)
        _, q, a = rng.choice([qa for qa in ex.qas if qa[0] == kind])
        out.append((ex.image, q, a, kind))
    return out


def demo_picture() -> tuple[Image.Image, str, str]:
    """The picture, question and answer `make demo` uses (models/internvl-demo/demo.png, demo.json)."""
    objects = [("star", "yellow"), ("circle", "red"), None, ("triangle", "blue")]
    return _shapes_picture(random.Random(7), objects).image, QUESTION["colour"].format("star"), "yellow"


def corpus() -> list[str]:
    """Every question and answer text, for training the tokenizer."""
    texts = [QUESTION["total"], QUESTION["word"], QUESTION["number"], QUESTION["ink"]]
    texts += [QUESTION[k].format(s) for k in ("colour", "count", "where") for s in SHAPES]
    texts += [QUESTION["shape"].format(c) for c in COLOURS]
    texts += list(COLOURS) + SHAPES + QUADRANTS + WORDS + NUMBERS + [str(i) for i in range(1, 5)]
    return texts
