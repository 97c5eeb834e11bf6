"""n-gram decontamination of training problems against evaluation benchmarks.

As the official REDI code (and open-r1's decontamination script): text is lower-cased, punctuation
removed, whitespace collapsed, and a training problem is contaminated when it shares any word
n-gram (n = 8) with a benchmark problem. A text shorter than n words has no n-gram and is never flagged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_NON_WORD = re.compile(r"[^\w\s]")


def normalise(text: str) -> list[str]:
    """Lower-cased words without punctuation."""
    return _NON_WORD.sub(" ", text.lower()).split()


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = normalise(text)
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


class Decontaminator:
    """Index of every benchmark's n-grams; ``hits(problem)`` names the benchmarks a problem overlaps."""

    def __init__(self, benchmarks: dict[str, Iterable[str]], n: int = 8):
        self.n = n
        self.index: dict[tuple[str, ...], set[str]] = {}
        for name, problems in benchmarks.items():
            for p in problems:
                for g in ngrams(p, n):
                    self.index.setdefault(g, set()).add(name)

    def hits(self, problem: str) -> list[str]:
        found: set[str] = set()
        for g in ngrams(problem, self.n):
            found |= self.index.get(g, set())
        return sorted(found)
