"""Training and evaluation data: Alpaca-format JSONL files and the built-in arithmetic word problems.

An example is the paper's MATH-10K / Commonsense-170K record: ``instruction``, optional ``input``,
``output`` (the response the model learns), and optionally ``answer`` (the reference that
exact-match accuracy compares against; without it, the output's last number or last word).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    instruction: str
    output: str
    input: str = ""
    answer: str | None = None


# ----------------------------------------------------------------------------- JSONL files
def _example_from_record(record, where: str) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with 'instruction' and 'output', got {type(record).__name__}")
    for key in ("instruction", "output"):
        if key not in record:
            raise DataError(f"{where}: missing field {key!r} (Alpaca format: instruction, input, output)")
    for key in ("instruction", "output", "input", "answer"):
        if key in record and record[key] is not None and not isinstance(record[key], str):
            if key == "answer" and isinstance(record[key], (int, float)):
                continue
            raise DataError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
    if not record["instruction"].strip():
        raise DataError(f"{where}: field 'instruction' is empty")
    answer = record.get("answer")
    return Example(instruction=record["instruction"], output=record["output"], input=record.get("input") or "",
                   answer=None if answer is None else str(answer))


def load_jsonl(path: str) -> list[Example]:
    """Examples of a JSONL file (one object per line; blank lines skipped) or of a JSON array file.

    Every malformed line is an error naming ``path:line`` and what is wrong (up to ten of them).
    """
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # the paper's MATH-10K ships as one JSON array
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        examples = [_example_from_record(r, f"{path}: item {i}") for i, r in enumerate(records)]
    else:
        examples, errors = [], []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                errors.append(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})")
                continue
            try:
                examples.append(_example_from_record(record, f"{path}:{lineno}"))
            except DataError as err:
                errors.append(str(err))
        if errors:
            more = f"\n... and {len(errors) - 10} more malformed lines" if len(errors) > 10 else ""
            raise DataError("\n".join(errors[:10]) + more)
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


# ----------------------------------------------------------------------------- built-in set
# The built-in set is generated from this fixed seed, independent of --seed, so its held-out split
# is the same in every run and accuracies of different runs are comparable.
ARITHMETIC_SEED = 20250
_NAMES = ["Tom", "Anna", "Liam", "Mia", "Noah", "Emma", "Omar", "Sofia", "Ravi", "Chen", "Lucas", "Zoe"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "coins", "stamps", "shells", "cards"]


def _problem(rng: random.Random) -> tuple[str, str]:
    """One word problem with its worked answer ``a op b = c`` (numbers small enough for a 135M model)."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        q = rng.choice([f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                        f"{name} had {a} {item}. A friend gave {name} {b} more. How many {item} does {name} have?"])
        return q, f"{a} + {b} = {a + b}"
    if kind == 1:
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        q = rng.choice([f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?",
                        f"{name} had {a} {item} and lost {b} of them. How many {item} are left?"])
        return q, f"{a} - {b} = {a - b}"
    if kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        q = rng.choice([f"{name} has {a} boxes with {b} {item} in each box. How many {item} are there in total?",
                        f"{name} buys {a} packs of {item}. Each pack has {b} {item}. How many {item} does {name} buy?"])
        return q, f"{a} * {b} = {a * b}"
    b, c = rng.randint(2, 9), rng.randint(2, 12)
    q = f"{name} shares {b * c} {item} equally among {b} friends. How many {item} does each friend get?"
    return q, f"{b * c} / {b} = {c}"


def arithmetic_problems(n_train: int, n_test: int) -> tuple[list[Example], list[Example]]:
    """Disjoint train and held-out test sets of generated word problems with numeric answers."""
    rng = random.Random(ARITHMETIC_SEED)
    seen, test, train = set(), [], []
    while len(test) < n_test or len(train) < n_train:
        q, solution = _problem(rng)
        if q in seen:
            continue
        seen.add(q)
        ex = Example(instruction=q, output=solution, answer=solution.rsplit("=", 1)[1].strip())
        # Test first, so the held-out set does not change with the size of the training set.
        (test if len(test) < n_test else train).append(ex)
    return train, test
