#!/usr/bin/env python
"""Pre-tokenize a corpus into megatron-core's indexed format, for training with data.kind=indexed.

  python tools/prepare_data.py --kind code --input DIR --tokenizer TOK --output PREFIX [--workers K]
  python tools/prepare_data.py --kind jsonl --input qa.jsonl --prompt-key question --response-key answer ...
  python tools/prepare_data.py --kind chat --input 'chats/*.parquet' --tokenizer CKPT/tokenizer ...
  python tools/prepare_data.py --kind translation --input pairs.tsv --source-lang German --target-lang English ...

Writes PREFIX.bin and PREFIX.idx (one sequence per document: its token ids, no EOS), PREFIX.keys.npy
(each document's split hash, so data.validation_fraction holds out the same documents as from the raw
files), for prompt/response kinds (jsonl, chat, translation) PREFIX.spans.npy (each response's token
spans: the response mask and data.response_anchor) and PREFIX.json (tokenizer, vocabulary size,
counts), all under temporary names renamed at the end: an error or an interrupt leaves nothing
behind. Existing outputs are never overwritten. Bad input gives one `error:` line naming the file and
line, and exit code 2.

Training reads the corpus in place through a memory map. The first run (or `train --check`) builds
each split's chunk index once into PREFIX.chunk_index/ (or data.cache_dir when this folder is not
writable); every later run and every process reuses it (docs/launching.md, Data).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# The data settings a corpus is prepared with, each a flag of the same name (data.path is --input);
# their help, defaults and checks are the data settings' own (ebft_megatron/data/config.py).
PREPARED = ("kind", "path", "extensions", "exclude_dirs", "prompt_key", "response_key", "chat_train_on", "source_key",
            "target_key", "source_lang", "target_lang", "template", "skip_bad", "max_documents")
FLAG_NAMES = {"path": "input"}


def flag_of(name: str) -> str:
    return "--" + FLAG_NAMES.get(name, name).replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    import dataclasses
    import typing

    from ebft_megatron.data.config import DataConfig
    from ebft_megatron.settings import default_of, field_types

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = {f.name: f for f in dataclasses.fields(DataConfig)}
    types = field_types(DataConfig)
    for name in PREPARED:
        f, kind = fields[name], types[name]
        text = f.metadata["help"]
        if name == "kind":
            choices = [k for k in typing.get_args(kind) if k != "indexed"]
            parser.add_argument(flag_of(name), required=True, choices=choices, help=text)
        elif kind is bool:
            parser.add_argument(flag_of(name), action="store_true", help=text)
        else:
            default = default_of(DataConfig, name)
            if isinstance(default, list):
                default = ",".join(default)
                text += " Comma-separated."
            parser.add_argument(flag_of(name), default=None, help=f"{text} (default: {default})")
    parser.add_argument("--tokenizer", required=True,
                        help="tokenizer folder (tokenizer.json or tokenizer.model), e.g. the model's checkpoint; it "
                             "must have an EOS token, and training must use the same tokenizer")
    parser.add_argument("--output", required=True,
                        help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.keys.npy and PREFIX.json; its "
                             "folder must exist and none of these files may exist yet")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes that tokenize in parallel (default 1); the output does not depend on it")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    return parser


def data_settings(args):
    """The data settings the flags give, built and checked as the trainer builds them."""
    from ebft_megatron.data.config import DataConfig
    from ebft_megatron.settings import build

    values = {}
    for name in PREPARED:
        value = getattr(args, name if name != "path" else "input")
        if value is None or value is False:
            continue
        if name in ("extensions", "exclude_dirs"):
            value = [item.strip() for item in value.split(",") if item.strip()]
        values[name] = value
    return build(DataConfig, values, "command line")


def prepare(args) -> None:
    from ebft_megatron.errors import UsageError
    from ebft_megatron.data.dataset import require_eos
    from ebft_megatron.data.indexed import tokenize_to_corpus
    from ebft_megatron.data.tokenizers import Tokenizer

    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    config = data_settings(args)
    tokenizer = Tokenizer(args.tokenizer)
    require_eos(tokenizer)
    path = config.resolved_path()
    start = time.monotonic()
    info, report = tokenize_to_corpus(config, path, tokenizer, args.output,
                                      tokenizer_name=str(Path(args.tokenizer).resolve()), workers=args.workers,
                                      label="[prepare]", verbose=not args.quiet)
    elapsed = time.monotonic() - start
    files = "bin,idx,keys.npy,spans.npy,json" if info.responses else "bin,idx,keys.npy,json"
    print(f"[prepare] wrote {args.output}.{{{files}}}: {info.documents} documents, {info.tokens} tokens "
          f"in {elapsed:.1f}s ({report.summary()})", file=sys.stderr, flush=True)


# The settings' errors name them as a config file spells them; here the user typed flags.
SETTING_TO_FLAG = {"set skip_bad=true": "pass --skip-bad", "command line: ": ""} | {
    f"data.{name}": flag_of(name) for name in PREPARED}


def in_flag_terms(message: str) -> str:
    for setting, flag in sorted(SETTING_TO_FLAG.items(), key=lambda item: -len(item[0])):
        message = message.replace(setting, flag)
    return message


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ebft_megatron.cli import run_cli
    from ebft_megatron.data.sources import DataError
    from ebft_megatron.settings import ConfigError

    def job():
        try:
            prepare(args)
        except (DataError, ConfigError) as err:
            raise DataError(in_flag_terms(str(err))) from None

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
