"""Tokenizers: a Hugging Face ``tokenizer.json`` (fast tokenizer) or a sentencepiece ``.model``.

Text is encoded without special tokens (no BOS), as the reference does; documents are joined with
EOS by the packing code. ``encode_batch_with_offsets`` also says which characters each token comes
from, so that a chat template's rendered text can be encoded whole and its assistant turns found
among the tokens.
"""

from __future__ import annotations

from pathlib import Path

from ebft_megatron.errors import UserError


class TokenizerError(UserError, ValueError):
    pass


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path
        self.folder = path if path.is_dir() else path.parent  # where tokenizer_config.json and a chat template are
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                self._load_hf(path)
            elif (path / "tokenizer.model").is_file():
                self._load_sentencepiece(path / "tokenizer.model")
            else:
                raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model in this folder")
        elif path.suffix == ".model":
            self._load_sentencepiece(path)
        elif path.suffix == ".json":
            self._load_hf(path.parent)
        else:
            raise TokenizerError(f"{path}: expected a tokenizer folder, a tokenizer.json or a sentencepiece .model")

    def _load_hf(self, folder: Path) -> None:
        from transformers import PreTrainedTokenizerFast

        try:
            self._hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
        except Exception as err:
            raise TokenizerError(f"{folder / 'tokenizer.json'}: cannot be loaded ({err})") from None
        config_path = folder / "tokenizer_config.json"
        eos = None
        if config_path.is_file():
            import json

            eos = json.loads(config_path.read_text()).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
        self.eos_id = self._hf.convert_tokens_to_ids(eos) if eos else None
        self.vocab_size = len(self._hf)
        self._encode = lambda text: self._hf.encode(text, add_special_tokens=False)
        backend = self._hf.backend_tokenizer
        self._encode_batch = lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        # offsets are character (not byte) positions in the Python string
        self._encode_offsets = lambda texts: [(e.ids, e.offsets)
                                              for e in backend.encode_batch(texts, add_special_tokens=False)]
        self._decode = lambda ids: self._hf.decode(ids, skip_special_tokens=False)

    def _load_sentencepiece(self, model_file: Path) -> None:
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except Exception as err:
            raise TokenizerError(f"{model_file}: not a sentencepiece model ({err})") from None
        eos = self._sp.eos_id()
        self.eos_id = eos if eos >= 0 else None
        self.vocab_size = self._sp.get_piece_size()
        self._encode = lambda text: self._sp.encode(text)
        self._encode_batch = lambda texts: self._sp.encode(list(texts))
        self._encode_offsets = self._sentencepiece_offsets
        self._decode = lambda ids: self._sp.decode(ids)

    def _sentencepiece_offsets(self, texts):
        import numpy as np

        try:
            protos = self._sp.encode(list(texts), return_type="proto")
        except (TypeError, ValueError):  # sentencepiece before return_type
            protos = self._sp.encode(list(texts), out_type="immutable_proto")
        out = []
        for text, proto in zip(texts, protos):
            # sentencepiece counts UTF-8 bytes; map them to characters (one past the end included)
            char_at = np.repeat(np.arange(len(text) + 1), [len(c.encode("utf-8")) for c in text] + [1])
            pieces = list(proto.pieces)
            out.append(([p.id for p in pieces], [(int(char_at[p.begin]), int(char_at[p.end])) for p in pieces]))
        return out

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` of each text, in one call (no Python round trip per text)."""
        return [list(ids) for ids in self._encode_batch(list(texts))]

    def encode_batch_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """``encode_batch``, each text's ids with each token's [start, end) character span in it."""
        return [(list(ids), [tuple(span) for span in offsets]) for ids, offsets in self._encode_offsets(list(texts))]

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])
