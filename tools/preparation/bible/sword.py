"""Reading SWORD zText modules: the module's .conf, its compressed entries, and each verse's text
and Strong's numbers (the zText format is described in the package's docstring)."""

from __future__ import annotations

import bz2
import html
import lzma
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tools.preparation.bible.versification import BibleError, VerseRef, testament_layout


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
