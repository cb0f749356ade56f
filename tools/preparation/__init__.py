"""Offline data preparation: turning public sources into the files the trainer reads (the English/
Spanish Bible translation pairs, the standard library's documented functions). Run by the scripts
in ``tools/``; nothing here is imported by ``ebft_megatron`` at training time."""
