"""The SWORD Bible reader, verse alignment, splits and tools/prepare_bible_translation.py, on tiny
synthetic modules written here from the format description (no network, no real .deb files).

The writer below places entries by its own arithmetic (module heading, testament heading, book
heading, chapter heading, verses), not by the reader's layout, so a wrong layout in the reader shows.
"""

import bz2
import io
import json
import lzma
import os
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

from tools.preparation import bible
from ebft_megatron.data.config import DataConfig
from ebft_megatron.data.sources import SkipReport, read_translation_pairs

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "prepare_bible_translation.py"

GENESIS_VERSES = (31, 25)  # chapters 1 and 2 of Genesis in the KJV versification
COMPRESS = {"ZIP": zlib.compress, "BZIP2": bz2.compress, "XZ": lzma.compress}


def genesis_index(chapter: int, verse: int) -> int:
    """Entry number of Gen chapter:verse in ot.bzv (verse 0 = the chapter heading)."""
    index = 3  # module heading 0, testament heading 1, Genesis heading 2
    for earlier in GENESIS_VERSES[:chapter - 1]:
        index += 1 + earlier
    return index + verse


def write_ztext(folder: Path, entries: list[str], compression: str = "ZIP", block_size: int = 7) -> None:
    """ot.bzs/bzv/bzz holding ``entries`` (empty string = empty entry), ``block_size`` per block."""
    folder.mkdir(parents=True, exist_ok=True)
    bzs, bzv, bzz = bytearray(), bytearray(), bytearray()
    for first in range(0, len(entries), block_size):
        block = bytearray()
        for text in entries[first:first + block_size]:
            data = text.encode("utf-8")
            block_number = len(bzs) // 12
            bzv += struct.pack("<IIH", block_number if data else 0, len(block) if data else 0, len(data))
            block += data
        compressed = COMPRESS[compression](bytes(block))
        bzs += struct.pack("<III", len(bzz), len(compressed), len(block))
        bzz += compressed
    for ext, data in (("bzs", bzs), ("bzv", bzv), ("bzz", bzz)):
        (folder / f"ot.{ext}").write_bytes(bytes(data))


def write_module(sword_root: Path, name: str, verses: dict[tuple[int, int], str], headings: dict[int, str] = (),
                 compression: str = "ZIP", conf_extra: str = "Versification=KJV\n") -> Path:
    """A zText module ``name`` with Genesis ``verses`` {(chapter, verse): markup}; the index ends at
    the last verse given, so everything after it is missing."""
    entries = [""] * (max(genesis_index(*key) for key in verses) + 1)
    for key, markup in verses.items():
        entries[genesis_index(*key)] = markup
    for index, markup in dict(headings).items():
        entries[index] = markup
    data_path = f"modules/texts/ztext/{name.lower()}/"
    write_ztext(sword_root / data_path, entries, compression)
    (sword_root / "mods.d").mkdir(parents=True, exist_ok=True)
    (sword_root / "mods.d" / f"{name.lower()}.conf").write_text(
        f"[{name}]\nDataPath=./{data_path}\nModDrv=zText\nEncoding=UTF-8\nCompressType={compression}\n"
        f"{conf_extra}Lang=xx\nAbout=a long \\\n  description\nVersion=1.0\n")
    return sword_root


def tagged(words: str, number: int) -> str:
    """A verse whose words carry Strong's number ``number`` (the same in both languages)."""
    return " ".join(f'<w lemma="strong:H{number:04d}">{word}</w>' for word in words.split())


def test_versification_matches_the_real_modules():
    assert len(bible.KJV_BOOKS) == 66 and bible.KJV_BOOKS[0].osis == "Gen" and bible.KJV_BOOKS[-1].osis == "Rev"
    assert sum(len(book.verse_counts) for book in bible.KJV_BOOKS) == 1189
    assert len(bible.all_verses()) == 31102
    # the index files of engKJV2006eb and spaRV1909eb hold 24,115 (ot) and 8,246 (nt) entries
    assert len(bible.testament_layout("ot")) == 24115 and len(bible.testament_layout("nt")) == 8246
    assert bible.KJV_BOOKS[bible.BOOK_INDEX["Ps"]].verse_counts[118] == 176
    assert bible.KJV_BOOKS[bible.BOOK_INDEX["Gen"]].verse_counts[:2] == GENESIS_VERSES
    ref = bible.VerseRef.parse("1Sam.3.10")
    assert str(ref) == "1Sam.3.10" and ref < bible.VerseRef.parse("Matt.1.1") < bible.VerseRef.parse("Rev.22.21")


def test_reader_finds_each_verse_and_cleans_its_markup(tmp_path):
    verses = {
        (1, 1): 'In the <w lemma="strong:H7225">beginning</w> God.<note placement="foot">Heb. note</note>',
        (1, 2): '<div type="x-milestone" subType="x-preverse" sID="p1"/><title>A heading</title>\u00b6 And '
                '<transChange type="added">it was</transChange> so &amp; good<lb type="x-p"/>indeed.',
        (1, 31): '<title canonical="true" type="psalm">A title kept.</title> Last of chapter one.',
        (2, 1): "First of chapter two.",
        (2, 3): "",
    }
    root = write_module(tmp_path / "sword", "TestEn", verses,
                        headings={2: "Genesis", 3: '<chapter n="1"/>'})
    module = bible.load_module(root, "testen")  # names are case-insensitive, as in SWORD
    assert module.name == "TestEn" and module.compression == "ZIP" and module.version == "1.0"
    read = bible.read_verses(module)
    ref = bible.VerseRef.parse
    assert read.texts[ref("Gen.1.1")] == "In the beginning God."
    assert read.texts[ref("Gen.1.2")] == "And it was so & good indeed."
    assert read.texts[ref("Gen.1.31")] == "A title kept. Last of chapter one."
    assert read.texts[ref("Gen.2.1")] == "First of chapter two."
    assert read.texts[ref("Gen.2.2")] == "" and read.texts[ref("Gen.2.3")] == ""
    assert ref("Gen.2.4") not in read.texts  # past the end of the index: missing
    assert "Genesis" not in read.texts.values()  # the book heading is not a verse
    assert read.strongs[ref("Gen.1.1")] == frozenset({"H7225"})
    assert len(read.texts) == 31 + 3


@pytest.mark.parametrize("compression", ["BZIP2", "XZ"])
def test_other_compressions_read_the_same(tmp_path, compression):
    verses = {(1, v): f"verse {v}" for v in range(1, 12)}
    zip_root = write_module(tmp_path / "zip", "M", verses)
    other_root = write_module(tmp_path / "other", "M", verses, compression=compression)
    assert bible.read_verses(bible.load_module(other_root, "M")).texts == \
        bible.read_verses(bible.load_module(zip_root, "M")).texts


def test_unsupported_or_damaged_modules_are_clear_errors(tmp_path):
    root = write_module(tmp_path / "a", "M", {(1, 1): "x"}, conf_extra="Versification=NRSVA\n")
    with pytest.raises(bible.BibleError, match="Versification=NRSVA"):
        bible.load_module(root, "M")
    with pytest.raises(bible.BibleError, match="no SWORD module Other .*modules found: M"):
        bible.load_module(root, "Other")
    root = write_module(tmp_path / "b", "M", {(1, 1): "x"})
    conf = root / "mods.d" / "m.conf"
    conf.write_text(conf.read_text().replace("CompressType=ZIP", "CompressType=LZSS"))
    with pytest.raises(bible.BibleError, match="CompressType=LZSS is not supported"):
        bible.load_module(root, "M")
    module_dir = root / "modules" / "texts" / "ztext" / "m"
    (module_dir / "ot.bzv").write_bytes((module_dir / "ot.bzv").read_bytes()[:-3])
    conf.write_text(conf.read_text().replace("CompressType=LZSS", "CompressType=ZIP"))
    with pytest.raises(bible.BibleError, match="not a whole number of 10-byte records"):
        bible.read_verses(bible.load_module(root, "M"))


def test_alignment_pairs_by_reference_and_counts_what_it_drops(tmp_path):
    english = {(1, v): tagged(f"english {v}", v) for v in range(1, 32)}
    spanish = {(1, v): tagged(f"spanish {v}", v) for v in range(1, 30)}  # 1:30 and 1:31 missing
    spanish[(1, 5)] = "<note>only a note</note>"  # empty once cleaned
    english[(1, 7)] = ""
    spanish[(1, 7)] = ""
    en = bible.read_verses(bible.load_module(write_module(tmp_path / "en", "En", english), "En"))
    es = bible.read_verses(bible.load_module(write_module(tmp_path / "es", "Es", spanish), "Es"))
    misaligned = {bible.VerseRef.parse("Gen.1.9")}
    alignment = bible.align_verses(en.texts, es.texts, ("en", "es"), misaligned)
    kept = [str(ref) for ref, *_ in alignment.pairs]
    assert kept == [f"Gen.1.{v}" for v in range(1, 30) if v not in (5, 7, 9)]
    ref, english_text, spanish_text = alignment.pairs[1]
    assert (str(ref), english_text, spanish_text) == ("Gen.1.2", "english 2", "spanish 2")
    assert alignment.dropped == {
        "empty in es": 1, "empty in en and es": 1, "missing in es": 2, bible.MISALIGNED: 1,
        "missing in en and es": 31102 - 31,  # every verse after Gen 1:31 is in neither index
    }
    assert "1 empty in es" in alignment.summary()


def test_strongs_check_finds_a_shifted_chapter_and_keeps_true_pairs():
    ref = bible.VerseRef.parse
    english = {ref(f"Gen.1.{v}"): frozenset({f"H{v}", f"H{100 + v}", "H1"}) for v in range(1, 32)}
    spanish = dict(english)
    # Gen 1:20-25 shifted: the Spanish slot v holds the translation of English verse v+1
    for v in range(20, 26):
        spanish[ref(f"Gen.1.{v}")] = english[ref(f"Gen.1.{v + 1}")]
    spanish[ref("Gen.1.3")] = frozenset({"H999"})  # nothing in common
    spanish[ref("Gen.1.4")] = frozenset()  # untagged: not judged
    flagged = bible.strongs_misaligned(english, spanish)
    assert {str(r) for r in flagged} == {"Gen.1.3"} | {f"Gen.1.{v}" for v in range(20, 26)}
    assert bible.strongs_misaligned(english, dict(english)) == set()


def test_splits_are_deterministic_disjoint_and_independent_of_order():
    refs = bible.all_verses()[:3000]
    splits = bible.assign_splits(refs, test_size=200, validation_size=300)
    shuffled = list(refs)
    random.Random(0).shuffle(shuffled)
    assert bible.assign_splits(shuffled, 200, 300) == splits
    assert sorted(splits) == sorted(refs)  # every verse in exactly one split
    sizes = {name: sum(split == name for split in splits.values()) for name in bible.SPLITS}
    assert sizes == {"train": 2500, "validation": 300, "test": 200}
    # held-out verses are spread over the books, not a block at the start
    assert len({ref.book_index for ref, split in splits.items() if split == "test"}) > 1
    # dropping a training verse leaves the held-out sets as they were
    gone = next(ref for ref, split in splits.items() if split == "train")
    smaller = bible.assign_splits([ref for ref in refs if ref != gone], 200, 300)
    assert {r for r, s in smaller.items() if s != "train"} == {r for r, s in splits.items() if s != "train"}
    reseeded = bible.assign_splits(refs, 200, 300, seed="other")
    assert {r for r, s in reseeded.items() if s == "test"} != {r for r, s in splits.items() if s == "test"}
    with pytest.raises(bible.BibleError, match="leaving none to train on"):
        bible.assign_splits(refs[:10], 5, 5)


def test_records_follow_the_direction():
    ref = bible.VerseRef.parse("Gen.1.1")
    alignment = bible.Alignment(("en", "es"), [(ref, "In the beginning", "En el principio")])
    splits = {ref: "test"}
    assert bible.parse_direction("both") == [("en", "es"), ("es", "en")]
    forward = bible.split_records(alignment, splits, ("en", "es"))
    backward = bible.split_records(alignment, splits, ("es", "en"))
    assert forward["test"] == [{"source": "In the beginning", "target": "En el principio", "ref": "Gen.1.1"}]
    assert backward["test"] == [{"source": "En el principio", "target": "In the beginning", "ref": "Gen.1.1"}]
    assert forward["train"] == [] and forward["validation"] == []
    with pytest.raises(bible.BibleError, match="not one of en-es, es-en, both"):
        bible.parse_direction("en-fr")


# --- .deb files -------------------------------------------------------------------------------------


def tar_xz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_deb(path: Path, files: dict[str, bytes], package: str) -> Path:
    """A minimal Debian package: an ar archive of debian-binary, control.tar.xz and data.tar.xz."""
    control = f"Package: {package}\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\n" \
              "Description: test\n"
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", tar_xz({"./control": control.encode()})),
               ("data.tar.xz", tar_xz(files))]
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode("ascii") + data
        if len(data) % 2:
            out += b"\n"
    path.write_bytes(bytes(out))
    return path


def module_deb(folder: Path, package: str, module: str, verses: dict, scratch: Path) -> Path:
    root = write_module(scratch / module, module, verses)
    files = {f"./usr/share/sword/{path.relative_to(root).as_posix()}": path.read_bytes()
             for path in sorted(root.rglob("*")) if path.is_file()}
    return write_deb(folder / f"{package}_1.0-1_all.deb", files, package)


@pytest.fixture
def debs(tmp_path):
    """sword-text-kjv and sword-text-sparv look-alikes holding Genesis 1 (31 verses)."""
    folder = tmp_path / "debs"
    folder.mkdir()
    english = {(1, v): tagged(f"and god made thing {v}", v) for v in range(1, 32)}
    spanish = {(1, v): tagged(f"y dios hizo cosa {v}", v) for v in range(1, 32)}
    spanish[(1, 4)] = ""
    module_deb(folder, "sword-text-kjv", "engKJV2006eb", english, tmp_path / "scratch")
    module_deb(folder, "sword-text-sparv", "spaRV1909eb", spanish, tmp_path / "scratch")
    return folder


@pytest.mark.parametrize("use_dpkg", [False, True])
def test_deb_unpacks_without_root(debs, tmp_path, use_dpkg):
    if use_dpkg and shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed; the standard-library path is tested")
    destination = tmp_path / "unpacked"
    bible.extract_deb(debs / "sword-text-kjv_1.0-1_all.deb", destination, use_dpkg=use_dpkg)
    root = destination / bible.SWORD_ROOT_IN_PACKAGE
    assert bible.load_module(root, "engKJV2006eb").data_dir.is_dir()
    (tmp_path / "broken.deb").write_bytes(b"not an archive")
    with pytest.raises(bible.BibleError, match="broken.deb"):
        bible.extract_deb(tmp_path / "broken.deb", destination, use_dpkg=use_dpkg)


def run_tool(*args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120)


def test_tool_writes_splits_from_debs(debs, tmp_path):
    out = tmp_path / "out"
    result = run_tool("--output", out, "--debs", debs, "--direction", "both", "--test-size", 3,
                      "--validation-size", 4)
    assert result.returncode == 0, result.stderr
    assert "aligned 30 verse pairs" in result.stderr and "1 empty in es" in result.stderr  # progress lines
    names = sorted(path.name for path in out.iterdir())
    assert names == sorted(["manifest.json"] + [f"{split}.{d}.jsonl" for split in bible.SPLITS
                                                for d in ("en-es", "es-en")])
    records = {name: [json.loads(line) for line in (out / name).read_text().splitlines()] for name in names
               if name.endswith(".jsonl")}
    assert [len(records[f"{split}.en-es.jsonl"]) for split in ("train", "validation", "test")] == [23, 4, 3]
    held_out = {r["ref"] for split in ("validation", "test") for r in records[f"{split}.en-es.jsonl"]}
    assert not held_out & {r["ref"] for r in records["train.en-es.jsonl"]}
    assert "Gen.1.4" not in held_out | {r["ref"] for r in records["train.en-es.jsonl"]}
    by_ref = {r["ref"]: r for split in bible.SPLITS for r in records[f"{split}.en-es.jsonl"]}
    assert by_ref["Gen.1.1"] == {"source": "and god made thing 1", "target": "y dios hizo cosa 1", "ref": "Gen.1.1"}
    assert [r["ref"] for r in records["train.en-es.jsonl"]] == sorted(
        (r["ref"] for r in records["train.en-es.jsonl"]), key=bible.VerseRef.parse)  # in Bible order
    backward = {r["ref"]: r for split in bible.SPLITS for r in records[f"{split}.es-en.jsonl"]}
    assert backward["Gen.1.1"]["source"] == "y dios hizo cosa 1"
    assert {r["ref"] for r in records["test.es-en.jsonl"]} == {r["ref"] for r in records["test.en-es.jsonl"]}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pairs"] == 30 and manifest["dropped"]["empty in es"] == 1
    assert manifest["sources"]["en"]["package"]["deb"] == "sword-text-kjv_1.0-1_all.deb"
    # the output is what kind=translation reads
    config = DataConfig(kind="translation", path=str(out / "test.en-es.jsonl"), source_lang="English",
                        target_lang="Spanish")
    documents = list(read_translation_pairs(config.path, config.translation_format(), False, SkipReport()))
    assert len(documents) == 3 and documents[0].segments[0].startswith("Translate from English to Spanish:\n")
    # the same inputs give the same files; existing outputs are kept unless --overwrite
    before = {name: (out / name).read_bytes() for name in names}
    refused = run_tool("--output", out, "--debs", debs, "--direction", "both", "--test-size", 3,
                       "--validation-size", 4)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    again = run_tool("--output", out, "--debs", debs, "--direction", "both", "--test-size", 3,
                     "--validation-size", 4, "--overwrite", "--quiet")
    assert again.returncode == 0 and again.stderr == ""
    assert {name: (out / name).read_bytes() for name in names} == before


def assert_one_error_line(result, *fragments, after_progress=False):
    """Exit 2 and one `error:` line (the last; only progress lines may come before it)."""
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    before = lines[:-1]
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert all(line.startswith("[bible] ") for line in before) if after_progress else not before, result.stderr
    for fragment in fragments:
        assert fragment in lines[-1]


def test_tool_missing_debs_is_one_error_line_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    result = run_tool("--output", out, "--debs", empty)
    assert_one_error_line(result, "sword-text-kjv", "sword-text-sparv", "apt-get download")
    assert not out.exists()
    assert list(empty.iterdir()) == []


def test_tool_download_failure_is_one_error_line(tmp_path):
    """No apt-get on PATH: the error says what to install or where to put the files."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    result = run_tool("--output", tmp_path / "out", "--cache-dir", tmp_path / "cache", env_extra={"PATH": str(bin_dir)})
    assert_one_error_line(result, "apt-get is not available", "--debs DIR")
    assert not (tmp_path / "out").exists()


def test_tool_bad_flags_are_one_error_line(tmp_path, debs):
    assert_one_error_line(run_tool("--output", tmp_path / "o", "--test-size", "many"), "--test-size", "see --help")
    assert_one_error_line(run_tool("--output", tmp_path / "o", "--debs", debs, "--test-size", -1),
                          "--test-size must be 0 or more")
    assert_one_error_line(run_tool("--output", tmp_path / "o", "--debs", debs, "--test-size", 20,
                                   "--validation-size", 20), "leaving none to train on", after_progress=True)
    assert not (tmp_path / "o").exists()


def test_tool_help_explains_every_flag():
    result = run_tool("--help")
    assert result.returncode == 0
    for flag in ("--output", "--direction", "--test-size", "--validation-size", "--seed", "--debs", "--sword-dir",
                 "--cache-dir", "--no-strongs-check", "--overwrite", "--quiet"):
        assert flag in result.stdout
