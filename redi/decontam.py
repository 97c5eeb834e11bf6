"""n-gram decontamination of training problems against evaluation benchmarks.

A training problem is contaminated when it shares any word n-gram (n = 8) with a benchmark problem.
A text shorter than n words has no n-gram and is never flagged. Two normalisations:

- ``whitespace``: lower-cased, whitespace collapsed, words split on whitespace (punctuation stays part of
  the words): the official REDI ``experiments_trl/decontaminate.py`` (``normalize_string`` +
  ``word_ngrams``, from open-r1's script).
- ``punctuation``: also every non-word character replaced by a space, so "integers, k," meets
  "integers k": catches reworded copies the official check misses (our default for removal).

The official script only reports (``verify.decontaminate: report``); removing is our practice.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_NON_WORD = re.compile(r"[^\w\s]")
NORMALISATIONS = ("whitespace", "punctuation")


def normalise(text: str, how: str = "punctuation") -> list[str]:
    """The words of ``text`` after the ``how`` normalisation (see the module docstring)."""
    if how == "whitespace":
        return text.lower().split()
    if how == "punctuation":
        return _NON_WORD.sub(" ", text.lower()).split()
    raise ValueError(f"unknown decontamination normalisation {how!r}: use one of {NORMALISATIONS}")


def ngrams(text: str, n: int, how: str = "punctuation") -> set[tuple[str, ...]]:
    words = normalise(text, how)
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


class Decontaminator:
    """Index of every benchmark's n-grams; ``hits(problem)`` names the benchmarks a problem overlaps."""

    def __init__(self, benchmarks: dict[str, Iterable[str]], n: int = 8, how: str = "punctuation"):
        self.n, self.how = n, how
        normalise("", how)  # an unknown normalisation fails here, not on the first problem
        self.index: dict[tuple[str, ...], set[str]] = {}
        for name, problems in benchmarks.items():
            for p in problems:
                for g in ngrams(p, n, how):
                    self.index.setdefault(g, set()).add(name)

    def hits(self, problem: str) -> list[str]:
        found: set[str] = set()
        for g in ngrams(problem, self.n, self.how):
            found |= self.index.get(g, set())
        return sorted(found)
