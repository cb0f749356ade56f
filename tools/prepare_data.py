#!/usr/bin/env python
"""Pre-tokenize a corpus into megatron-core's indexed format, for training with data.kind=indexed.

  python tools/prepare_data.py --kind code --input DIR --tokenizer TOK --output PREFIX [--workers K]
  python tools/prepare_data.py --kind jsonl --input qa.jsonl --prompt-key question --response-key answer ...
  python tools/prepare_data.py --kind translation --input pairs.tsv --source-lang German --target-lang English ...

Writes PREFIX.bin and PREFIX.idx (one sequence per document: its token ids, no EOS), PREFIX.keys.npy
(each document's split hash, so data.validation_fraction holds out the same documents as from the raw
files) and PREFIX.json (tokenizer, vocabulary size, counts), all under temporary names renamed at the
end: an error or an interrupt leaves nothing behind. Existing outputs are never overwritten. Bad input
gives one `error:` line naming the file and line, and exit code 2.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", required=True, choices=["code", "jsonl", "translation"],
                        help="code: a folder of source files, one file per document; jsonl: one prompt/response "
                             "pair per line; translation: source/target pairs in JSONL or TSV (with a header row)")
    parser.add_argument("--input", default=None,
                        help="the folder (code) or file (jsonl, translation) to read; for --kind code, leave it out "
                             "to use the Python standard library")
    parser.add_argument("--tokenizer", required=True,
                        help="tokenizer folder (tokenizer.json or tokenizer.model), e.g. the model's checkpoint; it "
                             "must have an EOS token, and training must use the same tokenizer")
    parser.add_argument("--output", required=True,
                        help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.keys.npy and PREFIX.json; its "
                             "folder must exist and none of these files may exist yet")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes that tokenize in parallel (default 1); the output does not depend on it")
    parser.add_argument("--extensions", default=".py",
                        help="code: comma-separated file suffixes to read (default .py)")
    parser.add_argument("--exclude-dirs", default=None,
                        help="code: comma-separated folder names to leave out at any depth (default: none, or the "
                             "test suites and site-packages when reading the standard library)")
    parser.add_argument("--prompt-key", default="question", help="jsonl: key of the prompt (default question)")
    parser.add_argument("--response-key", default="answer", help="jsonl: key of the response (default answer)")
    parser.add_argument("--source-key", default="source",
                        help="translation: JSONL key or TSV column of the source text (default source; a dotted "
                             "key such as translation.de reaches into nested objects)")
    parser.add_argument("--target-key", default="target",
                        help="translation: JSONL key or TSV column of the target text (default target)")
    parser.add_argument("--source-lang", default="", help="translation: source language name used in the template")
    parser.add_argument("--target-lang", default="", help="translation: target language name used in the template")
    parser.add_argument("--template", default=None,
                        help="translation: prompt template with {source_lang}, {target_lang} and {source} (default "
                             "'Translate from {source_lang} to {target_lang}:\\n{source}\\n'); the target follows it")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip malformed lines or files (counted and reported per reason) instead of stopping "
                             "at the first one")
    parser.add_argument("--max-documents", type=int, default=None,
                        help="keep only the first N documents of the input")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    return parser


def _list(value: str | None) -> list[str] | None:
    return None if value is None else [item.strip() for item in value.split(",") if item.strip()]


def prepare(args) -> None:
    from ebft_megatron.cli import UsageError
    from ebft_megatron.data.config import DEFAULT_TRANSLATION_TEMPLATE, DataConfig
    from ebft_megatron.data.dataset import Progress, open_documents, tokenized_documents
    from ebft_megatron.data.indexed import IndexedCorpusInfo, IndexedCorpusWriter
    from ebft_megatron.data.sources import DataError, SkipReport
    from ebft_megatron.data.tokenizers import Tokenizer

    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    if args.input is None and args.kind != "code":
        raise UsageError(f"--input is required for --kind {args.kind}")
    config = DataConfig(
        kind=args.kind, path=args.input, prompt_key=args.prompt_key, response_key=args.response_key,
        source_key=args.source_key, target_key=args.target_key, source_lang=args.source_lang,
        target_lang=args.target_lang, template=args.template or DEFAULT_TRANSLATION_TEMPLATE,
        extensions=_list(args.extensions), exclude_dirs=_list(args.exclude_dirs), skip_bad=args.skip_bad,
        max_documents=args.max_documents,
    )
    tokenizer = Tokenizer(args.tokenizer)
    if tokenizer.eos_id is None:
        raise DataError(f"the tokenizer {args.tokenizer} has no EOS token, which packing puts between documents; "
                        "use a tokenizer whose tokenizer_config.json names an eos_token")
    path = config.resolved_path()
    report = SkipReport()
    info = IndexedCorpusInfo(tokenizer=str(Path(args.tokenizer).resolve()), vocab_size=tokenizer.vocab_size,
                             eos_id=tokenizer.eos_id, kind=args.kind, source=str(path.resolve()))
    start = time.monotonic()
    with IndexedCorpusWriter(args.output, info) as out:
        source = open_documents(config, path, report, count_units=not args.quiet)
        progress = Progress(f"[prepare] {path}", source.total_units, source.unit, enabled=not args.quiet)
        for document in tokenized_documents(source, tokenizer, report, max_documents=config.max_documents,
                                            workers=args.workers, progress=progress):
            out.add(document.token_ids, document.key_hash)
        progress.close()
        if out.info.documents == 0:
            raise DataError(f"{path}: no documents ({report.summary()})")
        info.skipped = dict(report.counts)
    elapsed = time.monotonic() - start
    print(f"[prepare] wrote {args.output}.{{bin,idx,keys.npy,json}}: {info.documents} documents, {info.tokens} tokens "
          f"in {elapsed:.1f}s ({report.summary()})", file=sys.stderr, flush=True)


# The data code names settings as a config file spells them; here the user typed flags.
SETTING_TO_FLAG = {"set skip_bad=true": "pass --skip-bad", "data.path": "--input"} | {
    f"data.{name}": f"--{name.replace('_', '-')}" for name in (
        "prompt_key", "response_key", "source_key", "target_key", "source_lang", "target_lang", "template",
        "extensions", "exclude_dirs", "max_documents")}


def in_flag_terms(message: str) -> str:
    for setting, flag in SETTING_TO_FLAG.items():
        message = message.replace(setting, flag)
    return message


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ebft_megatron.cli import run_cli
    from ebft_megatron.data.sources import DataError

    def job():
        try:
            prepare(args)
        except DataError as err:
            raise DataError(in_flag_terms(str(err))) from None

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
