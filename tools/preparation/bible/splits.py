"""Train/validation/test splits by a hash of the verse reference, and writing them as translation
JSONL, all files or none."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

from ebft_megatron.data.sources import split_hash
from tools.preparation.bible.versification import BibleError, VerseRef
from tools.preparation.bible.alignment import Alignment


SPLITS = ("train", "validation", "test")


def assign_splits(refs: Iterable[VerseRef], test_size: int, validation_size: int, seed: str = "") -> dict[VerseRef, str]:
    """``test_size`` verses for test, ``validation_size`` for validation, the rest for train. Verses
    are ranked by a hash of their reference (and ``seed``), so the split depends only on which
    verses there are, never on their order, and a verse keeps its split when others come or go
    except near the cut."""
    refs = sorted(set(refs))
    if test_size < 0 or validation_size < 0:
        raise BibleError(f"split sizes must not be negative (test {test_size}, validation {validation_size})")
    if test_size + validation_size >= len(refs):
        raise BibleError(f"test ({test_size}) and validation ({validation_size}) together take all {len(refs)} "
                         "verse pairs, leaving none to train on; choose smaller sizes")
    ranked = sorted(refs, key=lambda ref: (split_hash(f"{seed}:{ref}" if seed else str(ref)), ref))
    splits = {ref: "test" for ref in ranked[:test_size]}
    splits.update({ref: "validation" for ref in ranked[test_size:test_size + validation_size]})
    splits.update({ref: "train" for ref in ranked[test_size + validation_size:]})
    return splits


def parse_direction(direction: str, languages: tuple[str, str] = ("en", "es")) -> list[tuple[str, str]]:
    """``"en-es"`` -> [("en", "es")]; ``"both"`` -> both directions."""
    first, second = languages
    choices = {f"{first}-{second}": [(first, second)], f"{second}-{first}": [(second, first)],
               "both": [(first, second), (second, first)]}
    if direction not in choices:
        raise BibleError(f"direction {direction!r} is not one of {', '.join(choices)}")
    return choices[direction]


def split_records(alignment: Alignment, splits: Mapping[VerseRef, str],
                  direction: tuple[str, str]) -> dict[str, list[dict]]:
    """{split: [{"source", "target", "ref"}, ...]} for one direction, each split in canonical order.
    ``ref`` (OSIS, e.g. ``Gen.1.1``) is extra; the translation reader looks only at source/target."""
    source_at, target_at = (alignment.languages.index(language) for language in direction)
    records: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for ref, *texts in alignment.pairs:
        records[splits[ref]].append({"source": texts[source_at], "target": texts[target_at], "ref": str(ref)})
    return records


def split_file_name(split: str, direction: tuple[str, str]) -> str:
    return f"{split}.{direction[0]}-{direction[1]}.jsonl"


def jsonl_text(records: Iterable[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def write_all_or_nothing(files: Mapping[Path, str]) -> None:
    """Write every file under a temporary name in its folder, then rename them all: an error or an
    interrupt part-way leaves no output and no temporary file behind."""
    temporaries: list[tuple[Path, Path]] = []
    try:
        for path, text in files.items():
            temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
            temporaries.append((temporary, path))
            temporary.write_text(text, encoding="utf-8")
        for temporary, path in temporaries:
            os.replace(temporary, path)
    finally:
        for temporary, _ in temporaries:
            temporary.unlink(missing_ok=True)
