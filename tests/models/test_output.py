"""The output layer applied in row chunks (models.output.OutputHead): log-probs and their gradients
equal a plain log-softmax over the real vocabulary, for any chunk size, and no chunk holds more
rows than asked. Tensor parallelism is covered by tests/parallel."""

import pytest
import torch

from ebft_megatron.models.output import Logits, OutputHead

V, PADDED, H, N = 37, 48, 16, 23


@pytest.fixture(scope="module", autouse=True)
def single_process():
    from ebft_megatron.runtime import distributed

    distributed.initialize(1, 1)


def _problem(seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(PADDED, H, generator=gen) * 0.5
    targets = torch.randint(0, V, (N,), generator=gen)
    upstream = torch.randn(N, generator=gen)
    return hidden, weight, targets, upstream


def _reference(hidden, weight, targets, temperature):
    logits = hidden @ weight[:V].t() / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk_rows", [1, 5, N, N + 9])
def test_chunked_logprobs_and_gradients_equal_log_softmax(chunk_rows, temperature, monkeypatch):
    hidden, weight, targets, upstream = _problem(seed=chunk_rows)
    rows_seen = []
    original = OutputHead.chunk_logits
    monkeypatch.setattr(OutputHead, "chunk_logits",
                        lambda self, h, *a: rows_seen.append(h.shape[0]) or original(self, h, *a))

    h1, w1 = hidden.clone().requires_grad_(True), torch.nn.Parameter(weight.clone())
    head = OutputHead(w1, 0, V, chunk_rows)
    got = head.logprobs(h1, targets, temperature)
    (got * upstream).sum().backward()

    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    expected = _reference(h2, w2, targets, temperature)
    (expected * upstream).sum().backward()

    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(w1.grad[V:]) == 0  # the padded vocabulary never takes part
    # forward and backward each went through the rows a chunk at a time
    chunks = -(-N // chunk_rows)
    assert len(rows_seen) == 2 * chunks and max(rows_seen) == min(chunk_rows, N)


def test_full_logits_path_masks_nothing_itself_and_matches():
    """Logits (megatron's vocab-parallel cross entropy on full logits) gives the same numbers as
    the chunked head when the padded vocabulary is at -inf, as the model's output layer sets it."""
    hidden, weight, targets, _ = _problem(seed=3)
    logits = hidden @ weight.t()
    logits[:, V:] = float("-inf")
    rows = torch.tensor([0, 5, 5, 7])
    got = Logits(logits[None]).token_logprobs(rows, targets[rows][None], 0.6)[0]
    expected = _reference(hidden[rows], weight, targets[rows], 0.6)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
