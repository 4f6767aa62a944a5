"""Generate the built-in sample dataset ``mmbridge/_sample/shapes`` (deterministic, seeded).

Run ``python -m mmbridge._sample.make_sample`` (writes next to this file) or pass a target
folder. The output is byte-identical on every run with the same Pillow version.

What it holds (the layout of :meth:`mmbridge.data.MultimodalDataset.from_folder`):

* 120 ids, 4 classes (Electric, Fire, Grass, Water), 30 each; ``splits.csv`` 20/5/5 per class
  (train 80, val 20, test 20).
* ``images/<id>.png``: RGBA with a transparent background, one shape whose colour and form
  follow the class 70% of the time each (independently); 32x32, every 7th image 48x48, so
  the loader's resize is exercised.
* ``text.csv``: a made-up name and two or three sentences; a class-revealing sentence is present
  for 60% of ids, the rest is neutral.
* ``numeric.csv``: ``hp, attack, speed, weight_kg, male_pct``; class-dependent means with wide
  noise; ``male_pct`` is empty for about 15% of ids (a real missing value).

No single modality is enough for perfect accuracy; together they are.
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SEED = 0
CLASSES = ("Electric", "Fire", "Grass", "Water")
PER_CLASS = 30
SPLIT_COUNTS = (("train", 20), ("val", 5), ("test", 5))
COLOURS = {"Electric": (240, 200, 30), "Fire": (220, 50, 30), "Grass": (40, 160, 60), "Water": (40, 90, 220)}
SHAPES = {"Electric": "diamond", "Fire": "triangle", "Grass": "square", "Water": "circle"}
REVEALING = {
    "Electric": ["Its cheeks spark with static.", "It stores electricity in its fur.", "Thunder follows it in storms."],
    "Fire": ["It breathes flames when angry.", "The tip of its tail burns hot.", "It lives near volcanoes."],
    "Grass": ["Leaves grow on its back.", "It soaks up sunlight to grow.", "It hides in tall grass."],
    "Water": ["It swims in deep lakes.", "It sprays water from its mouth.", "It rests on the sea shore."],
}
NEUTRAL = ["It is shy around people.", "It sleeps during the day.", "It travels in small groups.",
           "It is very curious.", "It guards its nest at night.", "Its cry echoes far away."]
SYLLABLES = ["ba", "zo", "ki", "ru", "mo", "pi", "ta", "le", "shu", "no", "va", "gi"]
# class -> (hp, attack, speed, weight_kg) means
MEANS = {"Electric": (55, 65, 95, 20), "Fire": (60, 85, 70, 45), "Grass": (65, 60, 55, 60), "Water": (80, 65, 60, 50)}


def _draw(rng: np.random.Generator, label: str, size: int) -> Image.Image:
    colour_cls = label if rng.random() < 0.7 else CLASSES[rng.integers(len(CLASSES))]
    shape_cls = label if rng.random() < 0.7 else CLASSES[rng.integers(len(CLASSES))]
    colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLOURS[colour_cls]) + (255,)
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    m = size // 8 + int(rng.integers(0, size // 8))
    lo, hi = m, size - 1 - m
    mid = size // 2
    shape = SHAPES[shape_cls]
    if shape == "circle":
        d.ellipse([lo, lo, hi, hi], fill=colour)
    elif shape == "square":
        d.rectangle([lo, lo, hi, hi], fill=colour)
    elif shape == "triangle":
        d.polygon([(mid, lo), (hi, hi), (lo, hi)], fill=colour)
    else:
        d.polygon([(mid, lo), (hi, mid), (mid, hi), (lo, mid)], fill=colour)
    return im


def _text(rng: np.random.Generator, label: str) -> str:
    name = "".join(SYLLABLES[k] for k in rng.integers(0, len(SYLLABLES), size=int(rng.integers(2, 4)))).capitalize()
    parts = [f"{name} is a small creature."]
    neutral = list(rng.choice(NEUTRAL, size=2, replace=False))
    if rng.random() < 0.6:
        parts.append(str(rng.choice(REVEALING[label])))
        parts.append(neutral[0])
    else:
        parts.extend(neutral)
    return " ".join(parts)


def make_sample(out: str | Path) -> Path:
    """Write the sample into ``out`` (replacing its ``images/`` and CSVs). Returns ``out``."""
    out = Path(out)
    rng = np.random.default_rng(SEED)
    labels = np.repeat(np.array(CLASSES), PER_CLASS)[rng.permutation(len(CLASSES) * PER_CLASS)]
    ids = list(range(1, len(labels) + 1))
    if (out / "images").exists():
        shutil.rmtree(out / "images")
    (out / "images").mkdir(parents=True)
    text_rows, num_rows = [], []
    for i, label in zip(ids, labels.tolist()):
        size = 48 if i % 7 == 0 else 32
        _draw(rng, label, size).save(out / "images" / f"{i}.png", optimize=True)
        text_rows.append([i, _text(rng, label), label])
        hp, atk, spd, wt = (m + rng.normal(0, s) for m, s in zip(MEANS[label], (15, 15, 15, 20)))
        male = "" if rng.random() < 0.15 else f"{float(rng.choice([0.0, 25.0, 50.0, 75.0, 87.5, 100.0])):.1f}"
        num_rows.append([i, round(max(hp, 10)), round(max(atk, 10)), round(max(spd, 10)), f"{max(wt, 1.0):.1f}", male,
                         label])
    split_rows = []
    for cls in CLASSES:
        cls_ids = [i for i, lab in zip(ids, labels.tolist()) if lab == cls]
        start = 0
        for name, n in SPLIT_COUNTS:
            split_rows += [[i, name] for i in cls_ids[start:start + n]]
            start += n
    split_rows.sort()
    # rows are written in id order here; the loader joins by id and does not rely on it
    for fname, header, rows in (
        ("text.csv", ["id", "text", "label"], text_rows),
        ("numeric.csv", ["id", "hp", "attack", "speed", "weight_kg", "male_pct", "label"], num_rows),
        ("splits.csv", ["id", "split"], split_rows),
    ):
        with open(out / fname, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(header)
            w.writerows(rows)
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "shapes"
    print(f"wrote the sample dataset to {make_sample(target)}")
