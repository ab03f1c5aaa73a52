"""`KernelBackend.apply_token_bitmask`: every backend against the pure-torch reference, and the reference against bits.

The Triton kernel runs on a GPU, or on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atom_trio.ops import CpuBackend, TorchRefBackend

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def backends() -> list:
    found = [pytest.param(CpuBackend(), "cpu", id="cpu")]
    if torch.cuda.is_available() or INTERPRET:
        from atom_trio.ops.triton import TritonBackend

        device = "cuda" if torch.cuda.is_available() else "cpu"
        found.append(pytest.param(TritonBackend(device), device, id="triton"))
    return found


@st.composite
def masks(draw):
    """Logits rows, a mask per chosen row (words beyond the vocabulary included), the chosen rows."""
    num_rows = draw(st.integers(1, 6))
    vocab = draw(st.one_of(st.integers(1, 9).map(lambda k: 32 * k), st.integers(1, 300)))  # whole words, or not
    num_words = -(-vocab // 32) + draw(st.integers(0, 1))
    rows = draw(st.lists(st.integers(0, num_rows - 1), unique=True, max_size=num_rows))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    words = rng.integers(-(2**31), 2**31, size=(len(rows), num_words), dtype=np.int32)
    logits = torch.from_numpy(rng.standard_normal((num_rows, vocab), dtype=np.float32))
    return logits, torch.from_numpy(words), torch.tensor(rows, dtype=torch.long)


@settings(max_examples=200, deadline=None)
@given(masks())
def test_the_reference_bans_exactly_the_zero_bits_of_the_named_rows(case):
    logits, words, rows = case
    out = logits.clone()
    TorchRefBackend().apply_token_bitmask(out, words, rows)
    vocab = logits.shape[1]
    for r in range(logits.shape[0]):
        named = (rows == r).nonzero()
        for token in range(vocab):
            banned = bool(named.numel()) and not (int(words[named[0, 0], token // 32]) >> (token % 32)) & 1
            assert out[r, token].item() == (float("-inf") if banned else logits[r, token].item())


@pytest.mark.parametrize(("backend", "device"), backends())
@settings(max_examples=60 if INTERPRET else 200, deadline=None)
@given(case=masks())
def test_each_backend_matches_the_reference(backend, device, case):
    logits, words, rows = case
    expected = logits.clone()
    TorchRefBackend().apply_token_bitmask(expected, words, rows)
    out = logits.clone().to(device)
    backend.apply_token_bitmask(out, words.to(device), rows.to(device))
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", [TorchRefBackend(), CpuBackend()], ids=["torch", "cpu"])
def test_a_mask_narrower_than_the_vocabulary_is_refused(backend):
    with pytest.raises(ValueError, match="does not cover"):
        backend.apply_token_bitmask(torch.zeros(1, 33), torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0]))
