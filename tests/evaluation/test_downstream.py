"""Downstream evaluations from in-context completions: which prompts are asked, how the answers
are scored (the completion engine itself is tested in test_completions.py)."""

import pytest

from ebft_megatron.evaluation import downstream


class WordTokenizer:
    def encode(self, text):
        return text.split()


def fake_completions(answers):
    """complete_in_context that answers each asked prompt from ``answers`` and records the call."""
    calls = []

    def complete(model, tokenizer, documents, which, anchor, samples, max_new_tokens, vocab, sampling, generator,
                 batch_size):
        calls.append({"documents": documents, "which": which, "samples": samples})
        return [[answers(documents[i])] * samples for i in which]

    return complete, calls


def test_translation_scores_the_first_line_of_each_completion(monkeypatch):
    documents = [("Translate: uno\n", "in the beginning was the word"),
                 ("Translate: dos tres cuatro cinco seis siete\n", "two"),
                 ("Translate: tres\n", "and the earth was without form")]
    complete, calls = fake_completions(lambda document: document[1] + "\nTranslate: more text")
    monkeypatch.setattr(downstream, "complete_in_context", complete)
    settings = downstream.DownstreamSettings(anchor=3, max_new_tokens=128, samples=4, temperature=0.6, top_p=0.95,
                                             batch_size=16)
    scores = downstream.translation_quality(None, WordTokenizer(), documents, settings, 10)
    # the 8-word prompt does not fit the anchor of 3 tokens; one completion per pair; the targets
    # follow their prompts on one line each in the in-context documents
    assert calls[0]["which"] == [0, 2] and calls[0]["samples"] == 1
    assert calls[0]["documents"][1] == ("Translate: dos tres cuatro cinco seis siete\n", "two\n")
    assert scores["translation/pairs"] == 2
    assert scores["translation/bleu"] == pytest.approx(100.0) and scores["translation/chrf"] == pytest.approx(100.0)


def test_wrong_translations_score_low(monkeypatch):
    documents = [("Translate: uno\n", "the first one here"), ("Translate: dos\n", "the second one here")]
    complete, _ = fake_completions(lambda document: "completely unrelated words")
    monkeypatch.setattr(downstream, "complete_in_context", complete)
    scores = downstream.translation_quality(
        None, WordTokenizer(), documents, downstream.DownstreamSettings(384, 128, 4, 0.6, 0.95, 16), 10)
    assert scores["translation/bleu"] < 5.0


def test_translation_files_need_the_prompt_languages(tmp_path):
    from ebft_megatron.cli import UsageError
    from ebft_megatron.data.config import DataConfig
    from ebft_megatron.evaluation.downstream import translation_documents

    path = tmp_path / "test.jsonl"
    path.write_text('{"source": "In the beginning", "target": "En el principio"}\n')
    with pytest.raises(UsageError, match="--translation needs data.source_lang and data.target_lang"):
        translation_documents(path, DataConfig(kind="jsonl", path=str(path)))
    data = DataConfig(kind="translation", path=str(path), source_lang="English", target_lang="Spanish")
    (prompt, target), = translation_documents(path, data)
    assert prompt == "Translate from English to Spanish:\nIn the beginning\n" and target == "En el principio"
