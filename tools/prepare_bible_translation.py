#!/usr/bin/env python
"""Build English/Spanish translation data (train/validation/test JSONL) from two public-domain
Bibles that Debian ships: the King James Version (package sword-text-kjv, module engKJV2006eb) and
the Reina-Valera 1909 (sword-text-sparv, spaRV1909eb).

  python tools/prepare_bible_translation.py --output ~/data/bible
  python tools/prepare_bible_translation.py --output ~/data/bible --direction both --test-size 1000
  python tools/prepare_bible_translation.py --output ~/data/bible --debs ~/Downloads   # no download

The two .deb files are fetched once with `apt-get download` (no root needed) into the cache folder
($EBFT_CACHE_DIR, default ~/.cache/ebft_megatron, under bible/debs) and unpacked into a temporary
folder without root. Verses are paired by book/chapter/verse; a verse that is empty or missing in
either Bible, or whose two texts do not share their Strong's numbers (a chapter numbered differently
in the Spanish), is dropped and counted. Each verse goes to test, validation or train by a hash of
its reference, so the split does not depend on the order of anything.

Writes, in --output, SPLIT.SRC-TGT.jsonl for each split and direction (keys source, target and ref,
e.g. {"source": "In the beginning ...", "target": "EN el principio ...", "ref": "Gen.1.1"}), usable
with data.kind=translation, and manifest.json (packages, counts, dropped verses, settings). All
files are written under temporary names and renamed at the end: an error leaves nothing behind.
Bad input gives one `error:` line and exit code 2.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.preparation import bible  # noqa: E402  (light: no torch, no megatron)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints its usage and then the error; keep to the one `error:` line of every tool."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True,
                        help="folder for the JSONL files and manifest.json (created if missing); files already "
                             "there are not overwritten unless --overwrite")
    parser.add_argument("--direction", default="en-es", choices=["en-es", "es-en", "both"],
                        help="en-es (default): English source, Spanish target; es-en: the reverse; both: the two "
                             "directions in separate files, each verse in the same split in both")
    parser.add_argument("--test-size", type=int, default=500, help="verse pairs held out for test (default 500)")
    parser.add_argument("--validation-size", type=int, default=500,
                        help="verse pairs held out for validation (default 500); the rest is train")
    parser.add_argument("--seed", default="",
                        help="any text mixed into the split hash to draw a different split (default: none)")
    parser.add_argument("--debs", default=None,
                        help="folder holding sword-text-kjv_*.deb and sword-text-sparv_*.deb already downloaded; "
                             "nothing is downloaded then")
    parser.add_argument("--sword-dir", default=None,
                        help="an unpacked SWORD library (a folder with mods.d/ and modules/), e.g. /usr/share/sword "
                             "after `apt install sword-text-kjv sword-text-sparv`; no .deb files are used then")
    parser.add_argument("--cache-dir", default=None,
                        help="where downloaded .deb files are kept (default $EBFT_CACHE_DIR or ~/.cache/ebft_megatron; "
                             "they go in its bible/debs)")
    parser.add_argument("--no-strongs-check", action="store_true",
                        help="keep verse pairs whose Strong's numbers disagree (shifted numbering); by default they "
                             "are dropped and counted")
    parser.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only errors")
    return parser


def prepare(args, log) -> None:
    directions = bible.parse_direction(args.direction, tuple(source.language for source in bible.SOURCES))
    for name, value in (("--test-size", args.test_size), ("--validation-size", args.validation_size)):
        if value < 0:
            raise bible.BibleError(f"{name} must be 0 or more, got {value}")
    if args.debs and args.sword_dir:
        raise bible.BibleError("give --debs or --sword-dir, not both")
    output = Path(args.output).expanduser()
    if output.exists() and not output.is_dir():
        raise bible.BibleError(f"--output {output} is a file, not a folder")
    targets = [output / bible.split_file_name(split, direction) for direction in directions for split in bible.SPLITS]
    targets.append(output / "manifest.json")
    existing = [path.name for path in targets if path.exists()]
    if existing and not args.overwrite:
        raise bible.BibleError(f"{output} already has {', '.join(existing)}; pass --overwrite to replace them")

    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ebft-bible-") as scratch:
        sword_root, packages = locate_modules(args, Path(scratch), log)
        verses = {}
        for source in bible.SOURCES:
            module = bible.load_module(sword_root, source.module)
            verses[source.language] = bible.read_verses(module)
            log(f"read {module.name} ({source.language_name}, version {module.version or '?'}): "
                f"{sum(map(bool, verses[source.language].texts.values()))} non-empty verses")
    first, second = (verses[source.language] for source in bible.SOURCES)
    misaligned = set() if args.no_strongs_check else bible.strongs_misaligned(first.strongs, second.strongs)
    alignment = bible.align_verses(first.texts, second.texts, tuple(verses), misaligned)
    log(f"aligned {len(alignment.pairs)} verse pairs; {alignment.summary()}")
    splits = bible.assign_splits((ref for ref, *_ in alignment.pairs), args.test_size, args.validation_size, args.seed)

    files, counts = {}, {}
    for direction in directions:
        for split, records in bible.split_records(alignment, splits, direction).items():
            name = bible.split_file_name(split, direction)
            files[output / name] = bible.jsonl_text(records)
            counts[name] = len(records)
    files[output / "manifest.json"] = json.dumps(manifest(args, packages, verses, alignment, counts), indent=2,
                                                 ensure_ascii=False) + "\n"
    output.mkdir(parents=True, exist_ok=True)
    bible.write_all_or_nothing(files)
    languages = {source.language: source.language_name for source in bible.SOURCES}
    for direction in directions:
        log(f"wrote {output}/{{train,validation,test}}.{direction[0]}-{direction[1]}.jsonl: "
            + ", ".join(f"{split} {counts[bible.split_file_name(split, direction)]}" for split in bible.SPLITS)
            + f" (train with data.kind=translation, data.source_lang={languages[direction[0]]}, "
              f"data.target_lang={languages[direction[1]]})")
    log(f"done in {time.monotonic() - start:.1f}s")


def locate_modules(args, scratch: Path, log) -> tuple[Path, dict]:
    """The SWORD library folder holding both modules, and {package: {deb, sha256}} when from .debs."""
    if args.sword_dir:
        root = Path(args.sword_dir).expanduser()
        if not (root / "mods.d").is_dir():
            raise bible.BibleError(f"--sword-dir {root} has no mods.d folder; point it at the SWORD library "
                                   "(e.g. /usr/share/sword)")
        return root, {}
    names = [source.package for source in bible.SOURCES]
    if args.debs:
        debs = bible.find_debs(Path(args.debs).expanduser(), names)
    else:
        from ebft_megatron.assets import cache_dir

        cache = Path(args.cache_dir).expanduser() if args.cache_dir else cache_dir()
        debs = bible.download_debs(cache / "bible" / "debs", names, log)
    packages = {}
    for package, deb in debs.items():
        log(f"unpacking {deb.name}")
        bible.extract_deb(deb, scratch)
        packages[package] = {"deb": deb.name, "sha256": bible.sha256_of(deb)}
    return scratch / bible.SWORD_ROOT_IN_PACKAGE, packages


def manifest(args, packages, verses, alignment, counts) -> dict:
    return {
        "sources": {language: {"module": found.module.name, "version": found.module.version,
                               "package": packages.get(source.package, {}), "verses": len(found.texts)}
                    for source, (language, found) in zip(bible.SOURCES, verses.items())},
        "pairs": len(alignment.pairs),
        "dropped": dict(sorted(alignment.dropped.items())),
        "strongs_check": not args.no_strongs_check,
        "split": {"test_size": args.test_size, "validation_size": args.validation_size, "seed": args.seed,
                  "by": "blake2b hash of the OSIS reference (seed:ref when a seed is given)"},
        "files": counts,
    }


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def log(message: str) -> None:
        if not args.quiet:
            print(f"[bible] {message}", file=sys.stderr, flush=True)

    # run_cli's default list of error types imports megatron (seconds); this tool never needs it
    from ebft_megatron.cli import run_cli

    return run_cli(lambda: prepare(args, log), also=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
