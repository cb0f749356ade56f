"""Downstream accuracy of a policy: unit-test tasks, HumanEval and translation, scored in the
sandbox or with BLEU/chrF; what ``python -m ebft_megatron.evaluate`` runs besides CE and CFM.

The in-context evaluations place each prompt after the documents before it in its list (earlier
tasks' prompt + original body; earlier HumanEval problems' prompt + canonical solution; earlier
pairs' source + target), so that many prompts decode together
(``completions.complete_in_context``). That is a few-shot protocol, not HumanEval's usual zero-shot
one: the numbers compare checkpoints with each other, not with published zero-shot scores.
:func:`humaneval_zero_shot` is the zero-shot protocol, one prompt at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from ebft_megatron.data.sources import SkipReport, read_translation_pairs
from ebft_megatron.errors import UsageError
from ebft_megatron.evaluation.completions import complete_in_context, complete_text
from ebft_megatron.evaluation.humaneval import evaluate_humaneval, load_problems
from ebft_megatron.evaluation.translation import clean_translation, translation_scores
from ebft_megatron.evaluation.unit_tests import evaluate_tasks
from ebft_megatron.rollouts.sampler import SamplingSettings


@dataclass(frozen=True)
class DownstreamSettings:
    """How completions are drawn (the evaluate command's flags say it)."""

    anchor: int  # prompts longer than this many tokens are left out
    max_new_tokens: int
    samples: int  # completions per prompt; pass@k for k = 1 and samples
    temperature: float
    top_p: float
    batch_size: int  # prompts decoded together
    seed: int = 1234

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(sorted({1, self.samples}))


def _fitting(tokenizer, prompts: Sequence[str], anchor: int) -> list[int]:
    return [i for i, prompt in enumerate(prompts) if len(tokenizer.encode(prompt)) <= anchor]


def _complete(model, tokenizer, documents, which, settings: DownstreamSettings, vocab_size: int):
    generator = torch.Generator().manual_seed(settings.seed)
    return complete_in_context(model, tokenizer, documents, which, settings.anchor, settings.samples,
                               settings.max_new_tokens, vocab_size,
                               SamplingSettings(settings.temperature, settings.top_p), generator, settings.batch_size)


def unit_test_accuracy(model, tokenizer, tasks, settings: DownstreamSettings, vocab_size: int,
                       limit: Optional[int] = None, items: Optional[dict] = None) -> dict:
    """pass@k over the (first ``limit``) tasks whose prompt fits the anchor; an ``items`` dict gets
    each task's pass@k (``unit_tests.evaluate_tasks``)."""
    which = _fitting(tokenizer, [task.prompt for task in tasks], settings.anchor)[:limit]
    completions = _complete(model, tokenizer, [(t.prompt, t.response) for t in tasks], which, settings, vocab_size)
    return evaluate_tasks([tasks[i] for i in which], completions, settings.ks, items=items)


def humaneval_accuracy(model, tokenizer, settings: DownstreamSettings, vocab_size: int,
                       limit: Optional[int] = None) -> dict:
    """pass@k over the first ``limit`` HumanEval problems whose prompt fits the anchor."""
    problems = load_problems()
    which = _fitting(tokenizer, [p.prompt for p in problems], settings.anchor)[:limit]
    completions = _complete(model, tokenizer, [(p.prompt, p.canonical_solution) for p in problems], which,
                            settings, vocab_size)
    by_prompt = {problems[i].prompt: texts for i, texts in zip(which, completions)}
    report = evaluate_humaneval(lambda prompt, n: by_prompt[prompt], [problems[i] for i in which],
                                settings.samples, settings.ks)
    return report.metrics()


def translation_quality(model, tokenizer, documents: Sequence[tuple[str, str]], settings: DownstreamSettings,
                        vocab_size: int, limit: Optional[int] = None) -> dict:
    """Corpus BLEU and chrF of one completion per held-out (prompt, target) document (the prompt
    rendered with the training template, as ``data.sources.read_translation_pairs`` gives it); the
    documents before each prompt, with their targets, are its in-context examples. The translation
    is the completion's first non-empty line."""
    which = _fitting(tokenizer, [prompt for prompt, _ in documents], settings.anchor)[:limit]
    single = replace(settings, samples=1)
    completions = _complete(model, tokenizer, [(prompt, target + "\n") for prompt, target in documents], which,
                            single, vocab_size)
    scores = translation_scores([clean_translation(texts[0]) for texts in completions],
                                [documents[i][1] for i in which])
    scores["translation/pairs"] = len(which)
    return scores


def humaneval_zero_shot(model, tokenizer, settings: DownstreamSettings, vocab_size: int,
                        limit: Optional[int] = None) -> dict:
    """pass@k over the first ``limit`` HumanEval problems, each prompt completed alone (zero-shot)."""
    sampling = SamplingSettings(settings.temperature, settings.top_p)
    generator = torch.Generator().manual_seed(settings.seed)

    def generate(prompt: str, num_samples: int) -> list[str]:
        return complete_text(model, tokenizer, prompt, num_samples, settings.max_new_tokens, vocab_size, sampling,
                             generator)

    report = evaluate_humaneval(generate, load_problems()[:limit], settings.samples, settings.ks)
    return report.metrics()


def translation_documents(path, data) -> list[tuple[str, str]]:
    """(prompt, target) pairs of a translation file, rendered with the data settings' template."""
    if not (data.source_lang.strip() and data.target_lang.strip()):
        raise UsageError("--translation needs data.source_lang and data.target_lang (e.g. data.source_lang=English "
                         "data.target_lang=Spanish), the languages the prompt template names")
    return [tuple(document.segments) for document in
            read_translation_pairs(path, data.translation_format(), False, SkipReport())]
