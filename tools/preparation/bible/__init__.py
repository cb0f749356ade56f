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

from tools.preparation.bible.alignment import MISALIGNED, Alignment, align_verses, strongs_misaligned
from tools.preparation.bible.packages import (
    ENGLISH_KJV,
    SOURCES,
    SPANISH_RV1909,
    SWORD_ROOT_IN_PACKAGE,
    BibleSource,
    download_debs,
    extract_deb,
    find_debs,
    sha256_of,
)
from tools.preparation.bible.splits import (
    SPLITS,
    assign_splits,
    jsonl_text,
    parse_direction,
    split_file_name,
    split_records,
    write_all_or_nothing,
)
from tools.preparation.bible.sword import ModuleVerses, SwordModule, load_module, osis_to_text, read_verses, strongs_numbers
from tools.preparation.bible.versification import (
    BOOK_INDEX,
    KJV_BOOKS,
    OLD_TESTAMENT_BOOKS,
    BibleError,
    Book,
    VerseRef,
    all_verses,
    testament_layout,
)

__all__ = [
    "Alignment", "BOOK_INDEX", "BibleError", "BibleSource", "Book", "ENGLISH_KJV", "KJV_BOOKS", "MISALIGNED",
    "ModuleVerses", "OLD_TESTAMENT_BOOKS", "SOURCES", "SPANISH_RV1909", "SPLITS", "SWORD_ROOT_IN_PACKAGE",
    "SwordModule", "VerseRef", "align_verses", "all_verses", "assign_splits", "download_debs", "extract_deb",
    "find_debs", "jsonl_text", "load_module", "osis_to_text", "parse_direction", "read_verses", "sha256_of",
    "split_file_name", "split_records", "strongs_misaligned", "strongs_numbers", "testament_layout",
    "write_all_or_nothing",
]
