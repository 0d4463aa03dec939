"""The ``cycles_mc`` task data: continue a repeating list, four three-word choices.

A context walks round a familiar cycle (weekdays, months, one to ten, letters a to l, five
colours) from a random point for a random number of words; the right choice is the next three
items, the distractors are the three after those shifted by one, the right three reversed, and
the last three context words again. Contexts are long and choices are several tokens, the shape
where lm-eval scores the same context once per choice (``analysis/evals/onepass.py``).

Generated, not hand-written: ``python -m analysis.evals.cycles`` rewrites ``data/tasks/cycles``
from a fixed seed, and the tests check the shipped files are what it writes. Every word is in the
vocabulary of the sequence task, so the word-level tokenizers built for the bundled tasks cover it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

CYCLES: dict[str, tuple[str, ...]] = {
    "days": ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"),
    "months": (
        *("january", "february", "march", "april", "may", "june"),
        *("july", "august", "september", "october", "november", "december"),
    ),
    "numbers": ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    "letters": ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"),
    "colours": ("red", "orange", "yellow", "green", "blue"),
}
ANSWER_WORDS = 3
SPLITS = {"test": (40, 0), "train": (8, 1)}  # split: (records, seed)
CONTEXT_WORDS = (12, 40)  # inclusive range of context lengths in words, for the shipped files


def cycles_records(
    count: int, seed: int, context_words: tuple[int, int] = CONTEXT_WORDS, answer_words: int = ANSWER_WORDS
) -> list[dict[str, Any]]:
    """``count`` task records from a generator seeded with ``seed``; contexts of ``context_words`` words.

    Each record: ``prompt``, four ``choices`` of ``answer_words`` words, ``label`` (the right
    choice's index), ``solution`` (the right words, for the proxy metrics) and ``list`` (the
    cycle's name). The benchmarks vary the two lengths; the shipped files use the defaults.
    """
    low, high = context_words
    if not 1 <= low <= high:
        raise ValueError(f"context_words must be 1 <= low <= high, got {context_words}")
    if answer_words < 2:
        raise ValueError(f"answer_words must be at least 2 (one word reversed is itself), got {answer_words}")
    rng = random.Random(seed)
    names = sorted(CYCLES)
    records = []
    for _ in range(count):
        name = rng.choice(names)
        cycle = CYCLES[name]
        start, length = rng.randrange(len(cycle)), rng.randint(low, high)
        walk = [cycle[(start + k) % len(cycle)] for k in range(length + answer_words + 1)]
        context, answer = walk[:length], walk[length : length + answer_words]
        shifted = walk[length + 1 : length + 1 + answer_words]
        repeated = [cycle[(start + length - answer_words + k) % len(cycle)] for k in range(answer_words)]
        choices = [" ".join(answer), " ".join(shifted), " ".join(reversed(answer)), " ".join(repeated)]
        if len(set(choices)) < len(choices):  # "repeated" is the answer when a cycle's length divides answer_words
            raise ValueError(f"answer_words={answer_words} makes two choices equal on the {name} cycle; use another")
        order = list(range(len(choices)))
        rng.shuffle(order)
        records.append(
            {
                "prompt": " ".join(context),
                "choices": [choices[k] for k in order],
                "label": order.index(0),
                "solution": choices[0],
                "list": name,
            }
        )
    return records


def write_cycles_task(folder: str | Path, context_words: tuple[int, int] = CONTEXT_WORDS) -> list[Path]:
    """Write ``test.jsonl`` and ``train.jsonl`` into ``folder``; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, (count, seed) in SPLITS.items():
        path = folder / f"{split}.jsonl"
        lines = "".join(json.dumps(r) + "\n" for r in cycles_records(count, seed, context_words))
        path.write_text(lines, encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    from analysis.evals.tasks import DEFAULT_DATA_DIR

    for written in write_cycles_task(DEFAULT_DATA_DIR / "cycles"):
        print(written)
