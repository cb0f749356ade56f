"""Pairing the verses of two modules by reference, and dropping the pairs whose Strong's numbers
say the two verses are not the same text."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from tools.preparation.bible.versification import VerseRef, all_verses


# ---------------------------------------------------------------------------------------------------
# Alignment and splits


@dataclass
class Alignment:
    languages: tuple[str, str]  # e.g. ("en", "es"): the order of the texts in each pair
    pairs: list[tuple[VerseRef, str, str]]  # in canonical order
    dropped: Counter = field(default_factory=Counter)  # reason -> verses

    def summary(self) -> str:
        if not self.dropped:
            return "none dropped"
        return "dropped " + ", ".join(f"{count} {reason}" for reason, count in sorted(self.dropped.items()))


MISALIGNED = "misaligned (Strong's numbers disagree)"


def _overlap(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


def strongs_misaligned(first: Mapping[VerseRef, frozenset[str]], second: Mapping[VerseRef, frozenset[str]],
                       min_overlap: float = 0.15, window: int = 8, margin: float = 0.1) -> set[VerseRef]:
    """Verses whose two texts are not translations of each other, judged by their Strong's numbers:
    the overlap (Jaccard) of the pair is below ``min_overlap``, or a verse up to ``window`` places
    away in the same book matches one side better by more than ``margin`` (a shifted numbering;
    genealogies share so many names that a low bar alone misses them). Verses without Strong's
    numbers on either side are not judged. The defaults separate the shifted chapters of the
    KJV/RV1909 pair cleanly; a repeated refrain (Psalm 42:5/11) is sometimes caught too."""
    verses = all_verses()
    flagged = set()
    for position, ref in enumerate(verses):
        a, b = first.get(ref, frozenset()), second.get(ref, frozenset())
        if not a or not b:
            continue
        paired = _overlap(a, b)
        if paired < min_overlap:
            flagged.add(ref)
            continue
        for other in verses[max(0, position - window):position + window + 1]:
            if other == ref or other.book_index != ref.book_index:
                continue
            if max(_overlap(a, second.get(other, frozenset())), _overlap(first.get(other, frozenset()), b)) > paired + margin:
                flagged.add(ref)
                break
    return flagged


def align_verses(first: Mapping[VerseRef, str], second: Mapping[VerseRef, str],
                 languages: tuple[str, str] = ("en", "es"), misaligned: Iterable[VerseRef] = ()) -> Alignment:
    """Pair the two texts of every KJV verse; a verse missing or empty on either side is dropped and
    counted under its reason (e.g. ``"empty in es"``, ``"missing in en and es"``), and so is a verse
    in ``misaligned`` (see ``strongs_misaligned``)."""
    alignment = Alignment(languages, [])
    misaligned = set(misaligned)
    for ref in all_verses():
        texts = (first.get(ref), second.get(ref))
        if all(texts):
            if ref in misaligned:
                alignment.dropped[MISALIGNED] += 1
            else:
                alignment.pairs.append((ref, texts[0], texts[1]))
            continue
        problems: dict[str, list[str]] = {}
        for language, text in zip(languages, texts):
            if not text:
                problems.setdefault("missing" if text is None else "empty", []).append(language)
        alignment.dropped["; ".join(f"{kind} in {' and '.join(langs)}" for kind, langs in problems.items())] += 1
    return alignment
