"""Translation quality: corpus BLEU and chrF (sacrebleu, 0-100, its default settings), and a loop
that asks a model to translate held-out pairs with the prompt the training data was built with.

Any ``translate_fn(prompts) -> texts`` (a generate call, an API, a lookup table in a test) can be
scored; ``python -m ebft_megatron.evaluate --translation FILE`` scores a checkpoint
(``evaluation.downstream.translation_quality``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping, Sequence

import sacrebleu

from ebft_megatron.data.config import DataConfig

BLEU = "translation/bleu"
CHRF = "translation/chrf"


def default_prompt_template() -> str:
    """The translation template a DataConfig uses when none is set, so evaluation prompts match the
    documents the model was trained on."""
    return next(f.default for f in dataclasses.fields(DataConfig) if f.name == "template")


def translation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF of ``hypotheses`` against one reference each."""
    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references; expected one each")
    if not references:
        raise ValueError("no translations to score")
    for name, texts in (("hypotheses", hypotheses), ("references", references)):
        if not all(isinstance(text, str) for text in texts):
            raise TypeError(f"{name} must be strings")
    return {BLEU: sacrebleu.corpus_bleu(hypotheses, [references]).score,
            CHRF: sacrebleu.corpus_chrf(hypotheses, [references]).score}


def _source_and_target(pair) -> tuple[str, str]:
    """A pair as (source, target), or a record with "source" and "target" (the JSONL the data tools
    write)."""
    if isinstance(pair, Mapping):
        return pair["source"], pair["target"]
    source, target = pair
    return source, target


def translation_prompts(sources: Iterable[str], prompt_template: str, source_lang: str, target_lang: str) -> list[str]:
    return [prompt_template.format(source_lang=source_lang, target_lang=target_lang, source=source)
            for source in sources]


def clean_translation(text: str) -> str:
    """The model's translation of one verse or sentence: its first non-empty line, stripped. A
    model that keeps going after the translation writes its next prompt or text on later lines."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def evaluate_translation(translate_fn: Callable[[list[str]], list[str]], pairs: Iterable,
                         prompt_template: str | None = None, source_lang: str = "English",
                         target_lang: str = "Spanish", batch_size: int | None = None,
                         first_line_only: bool = True) -> dict[str, float]:
    """Prompt ``translate_fn`` with every source (in batches of ``batch_size``, default all at once)
    and score its outputs against the targets: ``{"translation/bleu": ..., "translation/chrf": ...}``.

    ``pairs``: (source, target) tuples or {"source", "target"} records. ``prompt_template``: with
    {source_lang}, {target_lang} and {source}; default DataConfig's translation template.
    """
    template = default_prompt_template() if prompt_template is None else prompt_template
    sources, references = [], []
    for pair in pairs:
        source, target = _source_and_target(pair)
        sources.append(source)
        references.append(target)
    prompts = translation_prompts(sources, template, source_lang, target_lang)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    step = batch_size or max(len(prompts), 1)
    hypotheses = []
    for start in range(0, len(prompts), step):
        batch = prompts[start:start + step]
        outputs = list(translate_fn(batch))
        if len(outputs) != len(batch):
            raise ValueError(f"translate_fn returned {len(outputs)} texts for {len(batch)} prompts")
        if not all(isinstance(text, str) for text in outputs):
            raise TypeError("translate_fn must return strings")
        hypotheses.extend(clean_translation(text) if first_line_only else text for text in outputs)
    return translation_scores(hypotheses, references)
