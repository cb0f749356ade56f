"""BLEU/chrF scoring and the translation evaluation loop, against sacrebleu called directly."""

import pytest
import sacrebleu

from ebft_megatron.data.config import DataConfig
from ebft_megatron.evaluation.translation import (
    BLEU,
    CHRF,
    default_prompt_template,
    evaluate_translation,
    translation_scores,
)

REFERENCES = [
    "En el principio crió Dios los cielos y la tierra.",
    "Y la tierra estaba desordenada y vacía, y las tinieblas estaban sobre la haz del abismo.",
    "Y dijo Dios: Sea la luz: y fué la luz.",
]
SOURCES = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "And God said, Let there be light: and there was light.",
]
# A close but imperfect translation of each verse.
NEAR_MISSES = [
    "En el principio creó Dios los cielos y la tierra.",
    "Y la tierra estaba desordenada y vacía, y las tinieblas sobre la faz del abismo.",
    "Y dijo Dios: Sea la luz; y fue la luz.",
]


def test_identical_translations_score_100():
    scores = translation_scores(REFERENCES, REFERENCES)
    assert scores == {BLEU: pytest.approx(100.0), CHRF: pytest.approx(100.0)}


def test_scores_are_sacrebleus_corpus_scores():
    scores = translation_scores(NEAR_MISSES, REFERENCES)
    assert scores[BLEU] == pytest.approx(sacrebleu.corpus_bleu(NEAR_MISSES, [REFERENCES]).score)
    assert scores[CHRF] == pytest.approx(sacrebleu.corpus_chrf(NEAR_MISSES, [REFERENCES]).score)
    assert 20 < scores[BLEU] < 100 and 50 < scores[CHRF] < 100


def test_wrong_translations_score_lower():
    near = translation_scores(NEAR_MISSES, REFERENCES)
    shuffled = translation_scores(NEAR_MISSES[1:] + NEAR_MISSES[:1], REFERENCES)  # each paired with another verse
    english = translation_scores(SOURCES, REFERENCES)  # left untranslated
    for wrong in (shuffled, english):
        assert wrong[BLEU] < near[BLEU] - 20 and wrong[CHRF] < near[CHRF] - 20


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="2 hypotheses for 3 references"):
        translation_scores(REFERENCES[:2], REFERENCES)
    with pytest.raises(ValueError, match="no translations"):
        translation_scores([], [])


def test_evaluation_prompts_with_the_training_template():
    assert default_prompt_template() == DataConfig().template
    seen = []

    def translate(prompts):
        seen.extend(prompts)
        answers = {prompt: NEAR_MISSES[SOURCES.index(prompt.split("\n")[1])] for prompt in prompts}
        # models go on after the translation: only the first line counts
        return [f"{answers[prompt]}\nTranslate from English to Spanish:\nmore" for prompt in prompts]

    pairs = [{"source": s, "target": t, "ref": f"Gen.1.{i + 1}"} for i, (s, t) in enumerate(zip(SOURCES, REFERENCES))]
    scores = evaluate_translation(translate, pairs, None, batch_size=2)
    assert seen == [DataConfig().template.format(source_lang="English", target_lang="Spanish", source=s) for s in SOURCES]
    assert scores == translation_scores(NEAR_MISSES, REFERENCES)
    # tuples and a custom template work too; the template reaches translate_fn as written
    template = "{source_lang} -> {target_lang}: {source} =>"
    scores = evaluate_translation(lambda prompts: [REFERENCES[0]] * len(prompts), list(zip(SOURCES, REFERENCES)),
                                  template)
    assert scores[BLEU] < 100


def test_translate_fn_must_answer_every_prompt():
    with pytest.raises(ValueError, match="returned 1 texts for 3 prompts"):
        evaluate_translation(lambda prompts: ["x"], list(zip(SOURCES, REFERENCES)), None)
