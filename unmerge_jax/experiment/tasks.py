"""Fifteen synthetic sequence tasks on a tiny character vocabulary (no tokenizer, no downloads).

Each task is a seeded generator of ``(prompt, answer)`` character strings. :func:`encode_batch`
turns them into token ids ``[BOS, TAG_task, prompt…, SEP, answer…, EOS, PAD…]`` with labels on the
answer (and EOS) only, which is what LoRA fine-tuning and the mixed pre-training consume.

The tasks stand in for the paper's 15 datasets (§3.2): they are distinct enough that their LoRA
task vectors differ, cheap enough to train on two CPU cores in seconds.
"""

from __future__ import annotations

import string
from typing import Callable, NamedTuple

import numpy as np

from unmerge_jax.errors import UnmergeError

SPECIALS = ("<pad>", "<bos>", "<eos>", "<sep>")
CHARS = string.digits + string.ascii_lowercase + "+-*=,|()[]{}<>:"
PAD, BOS, EOS, SEP = range(4)
LETTERS = "abcdefghij"  # a small alphabet keeps every task learnable by a 2-layer model


class Task(NamedTuple):
    name: str
    description: str
    make: Callable[[np.random.Generator], tuple[str, str]]


def _letters(rng, lo=3, hi=7, alphabet=LETTERS):
    return "".join(rng.choice(list(alphabet), size=int(rng.integers(lo, hi + 1))))


def _digits(rng, lo=3, hi=7):
    return "".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(lo, hi + 1))))


def _brackets(rng):
    if rng.random() < 0.5:  # balanced by construction
        depth, out = 0, []
        for _ in range(int(rng.integers(2, 5))):
            if depth and rng.random() < 0.5:
                out.append(")")
                depth -= 1
            else:
                out.append("(")
                depth += 1
        return "".join(out) + ")" * depth
    return "".join(rng.choice(["(", ")"], size=int(rng.integers(2, 8))))


def _balanced(s):
    depth = 0
    for ch in s:
        depth += 1 if ch == "(" else -1
        if depth < 0:
            return False
    return depth == 0


_CIPHER = "".join(np.random.default_rng(1234).permutation(list(LETTERS)))
_SHIFT = {c: LETTERS[(i + 3) % len(LETTERS)] for i, c in enumerate(LETTERS)}
_SUBST = dict(zip(LETTERS, _CIPHER))


def _add(rng):
    a, b = (int(x) for x in rng.integers(0, 100, size=2))
    return f"{a}+{b}", str(a + b)


def _sub(rng):
    a, b = sorted(int(x) for x in rng.integers(0, 100, size=2))[::-1]
    return f"{a}-{b}", str(a - b)


def _mul(rng):
    a, b = int(rng.integers(0, 10)), int(rng.integers(0, 20))
    return f"{a}*{b}", str(a * b)


def _copy(rng):
    s = _letters(rng)
    return s, s


def _reverse(rng):
    s = _letters(rng)
    return s, s[::-1]


def _sort(rng):
    s = _letters(rng)
    return s, "".join(sorted(s))


def _bracket(rng):
    s = _brackets(rng)
    return s, "y" if _balanced(s) else "n"


def _caesar(rng):
    s = _letters(rng)
    return s, "".join(_SHIFT[c] for c in s)


def _substitute(rng):
    s = _letters(rng)
    return s, "".join(_SUBST[c] for c in s)


def _count(rng):
    s = _letters(rng, 3, 9, "abc")
    return s, str(s.count("a"))


def _parity(rng):
    s = "".join(rng.choice(["0", "1"], size=int(rng.integers(3, 9))))
    return s, str(s.count("1") % 2)


def _dedup(rng):
    s = "".join(c * int(rng.integers(1, 3)) for c in _letters(rng, 2, 5))
    out = "".join(c for i, c in enumerate(s) if i == 0 or s[i - 1] != c)
    return s, out


def _maximum(rng):
    s = _digits(rng)
    return ",".join(s), max(s)


def _interleave(rng):
    n = int(rng.integers(2, 4))
    a, b = _letters(rng, n, n), _letters(rng, n, n)
    return f"{a}|{b}", "".join(x + y for x, y in zip(a, b))


def _rotate(rng):
    s = _letters(rng)
    return s, s[1:] + s[0]


TASKS: tuple[Task, ...] = (
    Task("add", "two-digit addition", _add),
    Task("sub", "two-digit subtraction (non-negative)", _sub),
    Task("mul", "one-digit × up-to-19 multiplication", _mul),
    Task("copy", "copy a letter string", _copy),
    Task("reverse", "reverse a letter string", _reverse),
    Task("sort", "sort letters", _sort),
    Task("brackets", "is the bracket string balanced (y/n)", _bracket),
    Task("caesar", "shift-3 cipher over a–j", _caesar),
    Task("substitute", "fixed random substitution cipher over a–j", _substitute),
    Task("count", "count the a's", _count),
    Task("parity", "parity of the 1 bits", _parity),
    Task("dedup", "drop repeated neighbours", _dedup),
    Task("maximum", "largest digit in a list", _maximum),
    Task("interleave", "interleave two strings", _interleave),
    Task("rotate", "rotate left by one", _rotate),
)
TASK_NAMES = tuple(t.name for t in TASKS)
VOCAB = SPECIALS + tuple(CHARS) + tuple(f"<task:{n}>" for n in TASK_NAMES)
_IDS = {tok: i for i, tok in enumerate(VOCAB)}
VOCAB_SIZE = len(VOCAB)


def task(name: str) -> Task:
    for t in TASKS:
        if t.name == name:
            return t
    raise UnmergeError(f"unknown synthetic task {name!r}; choose one of: {', '.join(TASK_NAMES)}")


def sample(name: str, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` seeded ``(prompt, answer)`` pairs of task ``name``."""
    rng = np.random.default_rng([seed, TASK_NAMES.index(task(name).name)])
    make = task(name).make
    return [make(rng) for _ in range(n)]


def encode(name: str, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of one example and the index where the answer starts."""
    head = [BOS, _IDS[f"<task:{name}>"], *(_IDS[c] for c in prompt), SEP]
    return head + [_IDS[c] for c in answer] + [EOS], len(head)


def encode_batch(name: str, pairs, max_len: int) -> dict[str, np.ndarray]:
    """``input_ids``, ``attention_mask`` and ``labels`` (−100 outside the answer), padded to ``max_len``."""
    n = len(pairs)
    ids = np.full((n, max_len), PAD, np.int64)
    labels = np.full((n, max_len), -100, np.int64)
    mask = np.zeros((n, max_len), np.int64)
    for i, (p, a) in enumerate(pairs):
        seq, start = encode(name, p, a)
        if len(seq) > max_len:
            raise UnmergeError(f"task {name}: example of length {len(seq)} exceeds max_len={max_len}; raise max_len")
        ids[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1
        labels[i, start:len(seq)] = seq[start:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def decode(ids) -> str:
    return "".join(VOCAB[int(i)] if int(i) >= len(SPECIALS) else "" for i in ids)
