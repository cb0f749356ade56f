"""Validation CE against Hugging Face's causal-LM loss on the same chunks, pooled per token, and
the response-only CE against a hand computation with the response mask."""

import math
import statistics

import pytest
import torch

from ebft_megatron.data.packing import pack_documents
from ebft_megatron.evaluation import validation_ce

# Stream: 9 + 7 + 12 + 10 + 1 tokens and 4 EOS = 43 -> chunks of 16, 16 and a padded 11.
DOC_LENGTHS = (9, 7, 12, 10, 1)
RESPONSE_STARTS = (4, 7, 6, 3, 0)  # doc 1 is a code file (no response), doc 4 is all response
CHUNK_LEN = 16


@pytest.fixture(scope="module")
def chunks(qwen2_policy):
    vocab = qwen2_policy[1].vocab_size
    gen = torch.Generator().manual_seed(5)
    documents = [torch.randint(1, vocab, (length,), generator=gen).tolist() for length in DOC_LENGTHS]
    packed = pack_documents(documents, eos_id=0, chunk_len=CHUNK_LEN, response_starts=RESPONSE_STARTS)
    assert packed.lengths.tolist() == [16, 16, 11]  # the last chunk is padded
    return packed


@pytest.fixture(scope="module")
def hf_logits_per_chunk(qwen2_policy, chunks):
    """HF logits of each chunk's real tokens only (no padding in the input)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(qwen2_policy[2]), dtype=torch.float32).eval()
    with torch.no_grad():
        return [hf(input_ids=row[:length][None]).logits[0] for row, length in zip(chunks.tokens, chunks.lengths)]


def test_full_ce_equals_hugging_face_loss_pooled_per_token(qwen2_policy, chunks):
    from transformers import AutoModelForCausalLM

    model = qwen2_policy[0]
    hf = AutoModelForCausalLM.from_pretrained(str(qwen2_policy[2]), dtype=torch.float32).eval()
    nll_sum, targets = 0.0, 0
    with torch.no_grad():
        for row, length in zip(chunks.tokens, chunks.lengths.tolist()):
            real = row[:length][None]
            nll_sum += float(hf(input_ids=real, labels=real).loss) * (length - 1)  # HF: mean over length-1 targets
            targets += length - 1
    expected = nll_sum / targets

    with torch.no_grad():
        hf_chunk_ce = [float(hf(input_ids=row[:n][None], labels=row[:n][None]).loss)
                       for row, n in zip(chunks.tokens, chunks.lengths.tolist())]
    for micro_batch_size in (1, 2, 3):  # 2: an uneven last micro-batch
        chunk_ce = {}
        metrics = validation_ce(model, chunks, micro_batch_size=micro_batch_size, response_mask=None,
                                chunk_ce=chunk_ce)
        assert metrics["eval/tokens"] == targets == 15 + 15 + 10
        assert abs(metrics["eval/ce"] - expected) < 1e-5, micro_batch_size
        assert math.isclose(metrics["eval/perplexity"], math.exp(metrics["eval/ce"]), rel_tol=1e-12)
        # each chunk's own CE, keyed by its index, for comparisons paired by chunk
        assert sorted(chunk_ce) == [str(i) for i in range(len(chunks))]
        assert max(abs(chunk_ce[str(i)] - b) for i, b in enumerate(hf_chunk_ce)) < 1e-5, micro_batch_size
        assert abs(metrics["eval/ce_se"] - statistics.stdev(hf_chunk_ce) / 3 ** 0.5) < 1e-5
    # a per-chunk mean then a mean over chunks would weigh the short chunk more; pooling must not
    assert abs(sum(hf_chunk_ce) / len(chunks) - expected) > 1e-4


def test_response_ce_is_the_mean_over_response_targets(qwen2_policy, chunks, hf_logits_per_chunk):
    nll_sum, count = 0.0, 0
    for row, mask, logits in zip(chunks.tokens, chunks.response_mask, hf_logits_per_chunk):
        logp = torch.log_softmax(logits.double(), dim=-1)
        for k in range(1, logits.shape[0]):  # target x_k, predicted at k-1, counted if x_k is a response token
            if mask[k]:
                nll_sum -= float(logp[k - 1, row[k]])
                count += 1
    metrics = validation_ce(qwen2_policy[0], chunks, micro_batch_size=2)  # the chunks' own mask
    assert metrics["eval/response_tokens"] == count > 0
    assert abs(metrics["eval/response_ce"] - nll_sum / count) < 1e-5
    assert math.isclose(metrics["eval/response_perplexity"], math.exp(metrics["eval/response_ce"]))
    assert abs(metrics["eval/response_ce"] - metrics["eval/ce"]) > 1e-4  # the mask selects something


def test_explicit_mask_overrides_and_no_mask_gives_no_response_metrics(qwen2_policy, chunks, hf_logits_per_chunk):
    model = qwen2_policy[0]
    only_first = torch.zeros_like(chunks.response_mask)
    only_first[0, 5] = True  # one response target: x_5 of chunk 0
    metrics = validation_ce(model, chunks, response_mask=only_first)
    expected = -float(torch.log_softmax(hf_logits_per_chunk[0][4].double(), -1)[chunks.tokens[0, 5]])
    assert metrics["eval/response_tokens"] == 1
    assert abs(metrics["eval/response_ce"] - expected) < 1e-5

    none = validation_ce(model, chunks, response_mask=torch.zeros_like(chunks.response_mask))
    assert none["eval/response_tokens"] == 0 and "eval/response_ce" not in none

    unmasked = chunks.select(range(len(chunks)))
    unmasked.response_mask = None
    plain = validation_ce(model, unmasked)
    assert not any(key.startswith("eval/response") for key in plain)
    assert plain["eval/ce"] == pytest.approx(metrics["eval/ce"], abs=1e-12)

    with pytest.raises(ValueError, match="response_mask has shape"):
        validation_ce(model, chunks, response_mask=chunks.response_mask[:, :-1])


def test_document_masking_ce_equals_each_document_alone(qwen2_policy, chunks):
    """With document masking every logit is that of Hugging Face's model on its document alone
    (positions from 0); the targets stay every real next token, the first token of a document
    predicted from the end of the one before it included."""
    from transformers import AutoModelForCausalLM

    model, _, hf_dir = qwen2_policy
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    nll_sum, targets = 0.0, 0
    with torch.no_grad():
        for row, docs, length in zip(chunks.tokens, chunks.doc_ids.tolist(), chunks.lengths.tolist()):
            start = 0
            while start < length:
                end = start
                while end < length and docs[end] == docs[start]:
                    end += 1
                logp = torch.log_softmax(hf(input_ids=row[start:end][None]).logits[0].double(), dim=-1)
                for k in range(start, min(end, length - 1)):  # row k predicts x[k + 1]
                    nll_sum -= float(logp[k - start, row[k + 1]])
                    targets += 1
                start = end
    assert max(len(set(docs[:n])) for docs, n in zip(chunks.doc_ids.tolist(), chunks.lengths.tolist())) > 1
    masked = validation_ce(model, chunks, micro_batch_size=2, response_mask=None, document_masking=True)
    assert masked["eval/tokens"] == targets
    assert abs(masked["eval/ce"] - nll_sum / targets) < 1e-5
    plain = validation_ce(model, chunks, micro_batch_size=2, response_mask=None)
    assert abs(plain["eval/ce"] - masked["eval/ce"]) > 1e-4  # the documents matter
