"""Data: sources (JSONL/Parquet pairs, chat conversations rendered with the model's chat template,
code folders, translation pairs), tokenizers, packing into fixed chunks, megatron indexed corpora,
chunks read from a memory map through an index built once, and the chunk order of training.

The main names are imported on first use, so ``ebft_megatron.data.tokenizers`` stays a light import.
"""

_EXPORTS = {
    "DataConfig": "ebft_megatron.data.config",
    "DataError": "ebft_megatron.data.sources",
    "ChunkLoader": "ebft_megatron.data.dataset",
    "load_chunks": "ebft_megatron.data.dataset",
    "open_chunks": "ebft_megatron.data.mapped",
    "MappedChunks": "ebft_megatron.data.mapped",
    "PackedChunks": "ebft_megatron.data.packing",
    "pack_documents": "ebft_megatron.data.packing",
    "check_tokenizer_matches": "ebft_megatron.data.packing",
}
__all__ = sorted(_EXPORTS)

from ebft_megatron.lazy import lazy_exports  # noqa: E402

__getattr__ = lazy_exports(__name__, _EXPORTS)
