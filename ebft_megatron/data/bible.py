"""English/Spanish verse pairs from SWORD Bible modules (Debian ``sword-text-kjv`` and
``sword-text-sparv``): read the modules, align verses by book/chapter/verse, split them by a hash of
the reference, and write the splits as translation JSONL (``source``/``target``).

The SWORD zText format, as far as this reader needs it. A module's ``mods.d/<name>.conf`` names its
data folder (``DataPath``), driver (``ModDrv=zText``), compression and versification. Each
testament (``ot``, ``nt``) has three files:

- ``.bzz``: compressed blocks, one after the other;
- ``.bzs``: one 12-byte record per block: offset in ``.bzz``, compressed size, uncompressed size;
- ``.bzv``: one 10-byte record per entry: block number, offset inside the uncompressed block, size
  (all little-endian; the size is 16 bits).

Entry *i* of a testament is the *i*-th key of the versification in this order: the module heading,
the testament heading, then for each book its heading, and for each chapter its heading followed by
its verses. Headings are not verses and are never paired. Both modules used here declare
``Versification=KJV``, so the same entry number is the same verse in both; pairing goes through the
reference anyway, so a missing or empty verse on either side is dropped and counted, never shifted.

Sharing a versification does not make the numbering agree. Where the Reina-Valera numbers a chapter
differently (Numbers 13, Job 39-40, Jonah 2, ...), the module stores its own verse *n* in KJV slot *n*,
so whole chapters come out shifted by a verse or more, with the overflow merged into a chapter's
last slot. Both modules tag words with Strong's numbers of the Hebrew/Greek beneath them, so a
true pair shares most of them: ``strongs_misaligned`` finds the pairs that do not, and they are
dropped and counted too (212 of 31,102 verses in these two modules).
"""

from __future__ import annotations

import bz2
import hashlib
import html
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Callable, Iterable, Mapping

from ebft_megatron.data.sources import DataError, split_hash


class BibleError(DataError):
    """A missing package, an unreadable module or a bad setting; the message says what to do."""


# ---------------------------------------------------------------------------------------------------
# The KJV versification: OSIS book id and the number of verses in each chapter, in canonical order
# (66 books, 1,189 chapters, 31,102 verses). Read off the chapter markers of the engKJV2006eb module
# and checked equal to SWORD's own "KJV" system; the first 39 books are the Old Testament.
_KJV_VERSE_COUNTS = """
Gen 31 25 24 26 32 22 24 22 29 32 32 20 18 24 21 16 27 33 38 18 34 24 20 67 34 35 46 22 35 43 55 32 20 31 29 43 36 30 23 23 57 38 34 34 28 34 31 22 33 26
Exod 22 25 22 31 23 30 25 32 35 29 10 51 22 31 27 36 16 27 25 26 36 31 33 18 40 37 21 43 46 38 18 35 23 35 35 38 29 31 43 38
Lev 17 16 17 35 19 30 38 36 24 20 47 8 59 57 33 34 16 30 37 27 24 33 44 23 55 46 34
Num 54 34 51 49 31 27 89 26 23 36 35 16 33 45 41 50 13 32 22 29 35 41 30 25 18 65 23 31 40 16 54 42 56 29 34 13
Deut 46 37 29 49 33 25 26 20 29 22 32 32 18 29 23 22 20 22 21 20 23 30 25 22 19 19 26 68 29 20 30 52 29 12
Josh 18 24 17 24 15 27 26 35 27 43 23 24 33 15 63 10 18 28 51 9 45 34 16 33
Judg 36 23 31 24 31 40 25 35 57 18 40 15 25 20 20 31 13 31 30 48 25
Ruth 22 23 18 22
1Sam 28 36 21 22 12 21 17 22 27 27 15 25 23 52 35 23 58 30 24 42 15 23 29 22 44 25 12 25 11 31 13
2Sam 27 32 39 12 25 23 29 18 13 19 27 31 39 33 37 23 29 33 43 26 22 51 39 25
1Kgs 53 46 28 34 18 38 51 66 28 29 43 33 34 31 34 34 24 46 21 43 29 53
2Kgs 18 25 27 44 27 33 20 29 37 36 21 21 25 29 38 20 41 37 37 21 26 20 37 20 30
1Chr 54 55 24 43 26 81 40 40 44 14 47 40 14 17 29 43 27 17 19 8 30 19 32 31 31 32 34 21 30
2Chr 17 18 17 22 14 42 22 18 31 19 23 16 22 15 19 14 19 34 11 37 20 12 21 27 28 23 9 27 36 27 21 33 25 33 27 23
Ezra 11 70 13 24 17 22 28 36 15 44
Neh 11 20 32 23 19 19 73 18 38 39 36 47 31
Esth 22 23 15 17 14 14 10 17 32 3
Job 22 13 26 21 27 30 21 22 35 22 20 25 28 22 35 22 16 21 29 29 34 30 17 25 6 14 23 28 25 31 40 22 33 37 16 33 24 41 30 24 34 17
Ps 6 12 8 8 12 10 17 9 20 18 7 8 6 7 5 11 15 50 14 9 13 31 6 10 22 12 14 9 11 12 24 11 22 22 28 12 40 22 13 17 13 11 5 26 17 11 9 14 20 23 19 9 6 7 23 13 11 11 17 12 8 12 11 10 13 20 7 35 36 5 24 20 28 23 10 12 20 72 13 19 16 8 18 12 13 17 7 18 52 17 16 15 5 23 11 13 12 9 9 5 8 28 22 35 45 48 43 13 31 7 10 10 9 8 18 19 2 29 176 7 8 9 4 8 5 6 5 6 8 8 3 18 3 3 21 26 9 8 24 13 10 7 12 15 21 10 20 14 9 6
Prov 33 22 35 27 23 35 27 36 18 32 31 28 25 35 33 33 28 24 29 30 31 29 35 34 28 28 27 28 27 33 31
Eccl 18 26 22 16 20 12 29 17 18 20 10 14
Song 17 17 11 16 16 13 13 14
Isa 31 22 26 6 30 13 25 22 21 34 16 6 22 32 9 14 14 7 25 6 17 25 18 23 12 21 13 29 24 33 9 20 24 17 10 22 38 22 8 31 29 25 28 28 25 13 15 22 26 11 23 15 12 17 13 12 21 14 21 22 11 12 19 12 25 24
Jer 19 37 25 31 31 30 34 22 26 25 23 17 27 22 21 21 27 23 15 18 14 30 40 10 38 24 22 17 32 24 40 44 26 22 19 32 21 28 18 16 18 22 13 30 5 28 7 47 39 46 64 34
Lam 22 22 66 22 22
Ezek 28 10 27 17 17 14 27 18 11 22 25 28 23 23 8 63 24 32 14 49 32 31 49 27 17 21 36 26 21 26 18 32 33 31 15 38 28 23 29 49 26 20 27 31 25 24 23 35
Dan 21 49 30 37 31 28 28 27 27 21 45 13
Hos 11 23 5 19 15 11 16 14 17 15 12 14 16 9
Joel 20 32 21
Amos 15 16 15 13 27 14 17 14 15
Obad 21
Jonah 17 10 10 11
Mic 16 13 12 13 15 16 20
Nah 15 13 19
Hab 17 20 19
Zeph 18 15 20
Hag 15 23
Zech 21 13 10 14 11 15 14 23 17 12 17 14 9 21
Mal 14 17 18 6
Matt 25 23 17 25 48 34 29 34 38 42 30 50 58 36 39 28 27 35 30 34 46 46 39 51 46 75 66 20
Mark 45 28 35 41 43 56 37 38 50 52 33 44 37 72 47 20
Luke 80 52 38 44 39 49 50 56 62 42 54 59 35 35 32 31 37 43 48 47 38 71 56 53
John 51 25 36 54 47 71 53 59 41 42 57 50 38 31 27 33 26 40 42 31 25
Acts 26 47 26 37 42 15 60 40 43 48 30 25 52 28 41 40 34 28 41 38 40 30 35 27 27 32 44 31
Rom 32 29 31 25 21 23 25 39 33 21 36 21 14 23 33 27
1Cor 31 16 23 21 13 20 40 13 27 33 34 31 13 40 58 24
2Cor 24 17 18 18 21 18 16 24 15 18 33 21 14
Gal 24 21 29 31 26 18
Eph 23 22 21 32 33 24
Phil 30 30 21 23
Col 29 23 25 18
1Thess 10 20 13 18 28
2Thess 12 17 18
1Tim 20 15 16 16 25 21
2Tim 18 26 17 22
Titus 16 15 15
Phlm 25
Heb 14 18 19 16 14 20 28 13 28 39 40 29 25
Jas 27 26 18 17 20
1Pet 25 25 22 19 14
2Pet 21 22 18
1John 10 29 24 21 21
2John 13
3John 14
Jude 25
Rev 20 29 22 11 14 17 17 13 21 11 19 17 18 20 8 21 18 24 21 15 27 21
"""
OLD_TESTAMENT_BOOKS = 39


@dataclass(frozen=True)
class Book:
    osis: str  # OSIS id, e.g. "Gen", "1Sam"
    testament: str  # "ot" or "nt": the zText file pair it is stored in
    verse_counts: tuple[int, ...]  # verses in chapter 1, 2, ...


def _parse_versification(table: str) -> tuple[Book, ...]:
    books = []
    for number, line in enumerate(table.strip().splitlines()):
        osis, *counts = line.split()
        books.append(Book(osis, "ot" if number < OLD_TESTAMENT_BOOKS else "nt", tuple(map(int, counts))))
    return tuple(books)


KJV_BOOKS = _parse_versification(_KJV_VERSE_COUNTS)
BOOK_INDEX = {book.osis: index for index, book in enumerate(KJV_BOOKS)}


@dataclass(frozen=True, order=True)
class VerseRef:
    """A verse of the KJV versification; sorts in canonical order, prints as OSIS ``Gen.1.1``."""

    book_index: int  # position in KJV_BOOKS, so that sorting follows the Bible, not the alphabet
    chapter: int
    verse: int

    @property
    def book(self) -> str:
        return KJV_BOOKS[self.book_index].osis

    def __str__(self) -> str:
        return f"{self.book}.{self.chapter}.{self.verse}"

    @classmethod
    def parse(cls, osis: str) -> "VerseRef":
        book, chapter, verse = osis.rsplit(".", 2)
        return cls(BOOK_INDEX[book], int(chapter), int(verse))


def testament_layout(testament: str) -> list[VerseRef | None]:
    """The key of every entry of a zText testament file: a VerseRef, or None for a heading."""
    layout: list[VerseRef | None] = [None, None]  # module heading, testament heading
    for book_index, book in enumerate(KJV_BOOKS):
        if book.testament != testament:
            continue
        layout.append(None)  # book heading
        for chapter, count in enumerate(book.verse_counts, start=1):
            layout.append(None)  # chapter heading
            layout.extend(VerseRef(book_index, chapter, verse) for verse in range(1, count + 1))
    return layout


def all_verses() -> list[VerseRef]:
    return [ref for testament in ("ot", "nt") for ref in testament_layout(testament) if ref is not None]


# ---------------------------------------------------------------------------------------------------
# SWORD modules

# The compressions Python's standard library can undo; SWORD's LZSS is not among them.
_DECOMPRESSORS: dict[str, Callable[[bytes], bytes]] = {"ZIP": zlib.decompress, "BZIP2": bz2.decompress,
                                                       "XZ": lzma.decompress}
_TESTAMENT_FILES = ("bzs", "bzv", "bzz")


@dataclass(frozen=True)
class SwordModule:
    name: str
    conf: Path
    data_dir: Path
    driver: str
    compression: str
    encoding: str  # a Python codec name
    versification: str
    language: str
    version: str


def _conf_entries(path: Path) -> tuple[str, dict[str, str]]:
    """The section name and first value of each key of a SWORD .conf file (``\\`` continues a line)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:  # older modules write their .conf in Latin-1
        text = data.decode("latin-1")
    text = re.sub(r"\\\r?\n", " ", text)
    name, values = "", {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]") and not name:
            name = line[1:-1].strip()
        elif "=" in line:
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), value.strip())
    return name, values


def load_module(sword_root: str | Path, name: str) -> SwordModule:
    """The module ``name`` (case-insensitive) of a SWORD library folder (one holding ``mods.d``)."""
    root = Path(sword_root)
    confs = sorted((root / "mods.d").glob("*.conf")) if (root / "mods.d").is_dir() else []
    for conf in confs:
        section, values = _conf_entries(conf)
        if section.lower() == name.lower():
            return _module_from_conf(root, conf, section, values)
    found = ", ".join(_conf_entries(conf)[0] for conf in confs) or "none"
    raise BibleError(f"{root}: no SWORD module {name} in {root / 'mods.d'} (modules found: {found})")


def _module_from_conf(root: Path, conf: Path, name: str, values: dict[str, str]) -> SwordModule:
    driver = values.get("ModDrv", "")
    if driver.lower() != "ztext":
        raise BibleError(f"{conf}: ModDrv={driver or '(none)'}; this reader handles zText modules only")
    # SWORD's defaults when a key is absent: LZSS compression, Latin-1 text, KJV versification.
    compression = values.get("CompressType", "LZSS").upper()
    if compression not in _DECOMPRESSORS:
        raise BibleError(f"{conf}: CompressType={compression} is not supported (only {', '.join(_DECOMPRESSORS)})")
    versification = values.get("Versification", "KJV")
    if versification != "KJV":
        raise BibleError(f"{conf}: Versification={versification}; verses are paired through the KJV "
                         "versification only")
    encoding = "utf-8" if values.get("Encoding", "").upper().replace("-", "") == "UTF8" else "latin-1"
    data_path = values.get("DataPath", "")
    if not data_path:
        raise BibleError(f"{conf}: no DataPath, so the module's files cannot be found")
    return SwordModule(name=name, conf=conf, data_dir=(root / data_path).resolve(), driver=driver,
                       compression=compression, encoding=encoding, versification=versification,
                       language=values.get("Lang", ""), version=values.get("Version", ""))


def read_ztext_entries(data_dir: str | Path, testament: str, compression: str = "ZIP") -> list[bytes] | None:
    """Every entry of one testament, raw (markup bytes, empty for an empty entry); None when the
    module has no files for this testament (an NT-only module, say)."""
    data_dir = Path(data_dir)
    paths = {ext: data_dir / f"{testament}.{ext}" for ext in _TESTAMENT_FILES}
    present = [ext for ext, path in paths.items() if path.is_file()]
    if not present:
        return None
    if len(present) < len(paths):
        missing = [str(path) for ext, path in paths.items() if ext not in present]
        raise BibleError(f"{data_dir}: incomplete zText testament {testament}: missing {', '.join(missing)}")
    blocks_index, entries_index, compressed = (paths[ext].read_bytes() for ext in _TESTAMENT_FILES)
    for ext, data, width in (("bzs", blocks_index, 12), ("bzv", entries_index, 10)):
        if len(data) % width:
            raise BibleError(f"{paths[ext]}: {len(data)} bytes is not a whole number of {width}-byte records; "
                             "the file is damaged")
    decompress = _DECOMPRESSORS[compression]
    blocks: dict[int, bytes] = {}

    def block(number: int) -> bytes:
        if number not in blocks:
            if (number + 1) * 12 > len(blocks_index):
                raise BibleError(f"{paths['bzv']}: refers to block {number}, but {paths['bzs']} lists "
                                 f"{len(blocks_index) // 12}; the module is damaged")
            offset, size, _ = struct.unpack_from("<III", blocks_index, number * 12)
            try:
                blocks[number] = decompress(compressed[offset:offset + size])
            except (zlib.error, OSError, lzma.LZMAError, ValueError) as err:
                raise BibleError(f"{paths['bzz']}: block {number} does not decompress as {compression} ({err})") from None
        return blocks[number]

    entries = []
    for number in range(len(entries_index) // 10):
        block_number, start, size = struct.unpack_from("<IIH", entries_index, number * 10)
        if size == 0:
            entries.append(b"")  # never stored: no block to open
            continue
        text = block(block_number)
        if start + size > len(text):
            raise BibleError(f"{paths['bzv']}: entry {number} runs past the end of block {block_number}; "
                             "the module is damaged")
        entries.append(text[start:start + size].rstrip(b"\0"))
    return entries


# Notes (footnotes, cross references) and editors' headings are not part of the verse; canonical
# titles (the Psalm superscriptions) are, and other translations put them inside verse 1.
_DROPPED_ELEMENTS = re.compile(r"<note\b[^>]*?(?<!/)>.*?</note\s*>|<title\b(?![^>]*canonical=\"true\")[^>]*?(?<!/)>"
                               r".*?</title\s*>", re.S)
# Line, paragraph and division markers separate words; other tags (<w>, <transChange>, ...) sit
# inside words' surroundings and must not add spaces before punctuation.
_SPACING_TAGS = re.compile(r"</?(?:l|lg|lb|p|div|chapter|milestone|verse|title|q|item|list)\b[^>]*>")
_ANY_TAG = re.compile(r"<[^>]*>")


def osis_to_text(markup: str) -> str:
    """The plain verse text of an entry's OSIS markup."""
    text = _DROPPED_ELEMENTS.sub(" ", markup)
    text = _SPACING_TAGS.sub(" ", text)
    text = html.unescape(_ANY_TAG.sub("", text))
    text = text.replace("\u00b6", " ")  # the KJV's pilcrow marks a paragraph, it is not text
    return " ".join(text.split())


_LEMMA_ATTRIBUTE = re.compile(r'\blemma="([^"]*)"')
_STRONGS = re.compile(r"strong:([HG])0*(\d+)")


def strongs_numbers(markup: str) -> frozenset[str]:
    """The Strong's numbers tagged in an entry (``lemma="strong:H0430"`` -> ``H430``)."""
    return frozenset(f"{letter}{number}" for value in _LEMMA_ATTRIBUTE.findall(markup)
                     for letter, number in _STRONGS.findall(value))


@dataclass
class ModuleVerses:
    module: SwordModule
    texts: dict[VerseRef, str]  # every verse the module stores (possibly empty after cleaning)
    strongs: dict[VerseRef, frozenset[str]]  # Strong's numbers per verse (empty sets if untagged)


def read_verses(module: SwordModule) -> ModuleVerses:
    """Plain text of every verse in the module, keyed by reference; headings are left out."""
    texts: dict[VerseRef, str] = {}
    strongs: dict[VerseRef, frozenset[str]] = {}
    for testament in ("ot", "nt"):
        entries = read_ztext_entries(module.data_dir, testament, module.compression)
        if entries is None:
            continue
        layout = testament_layout(testament)
        if len(entries) > len(layout):
            raise BibleError(f"{module.data_dir / (testament + '.bzv')}: {len(entries)} entries, more than the "
                             f"{len(layout)} keys of the KJV versification; the module's Versification is not KJV")
        for ref, raw in zip(layout, entries):  # a shorter index simply ends early: the rest is missing
            if ref is not None:  # headings (book titles, chapter markers) are not verses
                markup = raw.decode(module.encoding, errors="replace")
                texts[ref] = osis_to_text(markup)
                strongs[ref] = strongs_numbers(markup)
    return ModuleVerses(module, texts, strongs)


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


# ---------------------------------------------------------------------------------------------------
# The Debian packages


@dataclass(frozen=True)
class BibleSource:
    language: str  # ISO 639-1 code, as in the direction ("en-es")
    language_name: str  # as the translation template says it
    package: str  # Debian package holding the module
    module: str  # SWORD module name inside it


ENGLISH_KJV = BibleSource("en", "English", "sword-text-kjv", "engKJV2006eb")
SPANISH_RV1909 = BibleSource("es", "Spanish", "sword-text-sparv", "spaRV1909eb")
SOURCES = (ENGLISH_KJV, SPANISH_RV1909)
# Where a dpkg-installed package puts its modules, and so where they are inside a .deb.
SWORD_ROOT_IN_PACKAGE = Path("usr/share/sword")
_MANUAL_DOWNLOAD = "https://packages.debian.org/bookworm/all/{package}/download"


def find_debs(folder: str | Path, packages: Iterable[str]) -> dict[str, Path]:
    """The .deb file of each package in ``folder`` (the newest name if there are several)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BibleError(f"{folder}: no such folder of .deb files")
    found, missing = {}, []
    for package in packages:
        candidates = sorted(folder.glob(f"{package}_*.deb"))
        if candidates:
            found[package] = candidates[-1]
        else:
            missing.append(package)
    if missing:
        names = " ".join(missing)
        raise BibleError(f"{folder}: no .deb file for {', '.join(missing)}; get it with `apt-get download {names}` "
                         f"(or from {_MANUAL_DOWNLOAD.format(package=missing[0])}) into that folder")
    return found


def download_debs(folder: str | Path, packages: Iterable[str], log: Callable[[str], None] = lambda _: None) -> dict[str, Path]:
    """The packages' .deb files in ``folder``, fetched once with ``apt-get download`` (which needs
    no root, only the machine's package lists)."""
    folder = Path(folder)
    packages = list(packages)
    cached = {package: sorted(folder.glob(f"{package}_*.deb")) for package in packages}
    wanted = [package for package, files in cached.items() if not files]
    if wanted:
        hint = (f"or download the .deb files (e.g. from {_MANUAL_DOWNLOAD.format(package=wanted[0])}) and pass "
                "--debs DIR")
        if shutil.which("apt-get") is None:
            raise BibleError(f"apt-get is not available to download {' '.join(wanted)}; install apt, {hint}")
        folder.mkdir(parents=True, exist_ok=True)
        log(f"downloading {' '.join(wanted)} with apt-get into {folder}")
        # A private folder first, so an interrupted download never looks like a cached package.
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as scratch:
            try:
                result = subprocess.run(["apt-get", "download", *wanted], cwd=scratch, capture_output=True,
                                        text=True, timeout=600)
            except subprocess.TimeoutExpired:
                raise BibleError(f"apt-get download {' '.join(wanted)} took more than 10 minutes; {hint}") from None
            if result.returncode != 0:
                errors = [line for line in result.stderr.splitlines() if line.startswith("E:")]
                reason = (errors or result.stderr.strip().splitlines() or ["no message"])[-1]
                raise BibleError(f"apt-get download {' '.join(wanted)} failed ({reason}); run `apt-get update` as "
                                 f"root first, {hint}")
            for deb in Path(scratch).glob("*.deb"):
                os.replace(deb, folder / deb.name)
    return find_debs(folder, packages)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract_deb(deb: str | Path, destination: str | Path, use_dpkg: bool | None = None) -> None:
    """Unpack a .deb's files under ``destination`` without root: ``dpkg-deb -x`` when it is there
    (or ``use_dpkg``), otherwise read the ar archive and its data.tar with the standard library."""
    deb, destination = Path(deb), Path(destination)
    if use_dpkg is None:
        use_dpkg = shutil.which("dpkg-deb") is not None
    if use_dpkg:
        result = subprocess.run(["dpkg-deb", "-x", str(deb), str(destination)], capture_output=True, text=True)
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise BibleError(f"{deb}: dpkg-deb -x failed ({reason}); download the package again")
        return
    data = _deb_member(deb, "data.tar")
    try:
        archive = tarfile.open(fileobj=BytesIO(data), mode="r:*")
    except tarfile.ReadError as err:
        raise BibleError(f"{deb}: its data archive cannot be read without dpkg-deb ({err}); install dpkg") from None
    with archive:
        archive.extractall(destination, filter="data")  # refuses absolute paths and links out of destination


def _deb_member(deb: Path, prefix: str) -> bytes:
    """The first member of the .deb (an ar archive) whose name starts with ``prefix``."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise BibleError(f"{deb}: not a .deb file (no ar archive header); download it again")
    position = 8
    while position + 60 <= len(data):
        header = data[position:position + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            break
        body = data[position + 60:position + 60 + size]
        if name.startswith(prefix):
            return body
        position += 60 + size + (size % 2)  # members start at even offsets
    raise BibleError(f"{deb}: no {prefix}* member; the file is damaged or not a Debian package")
