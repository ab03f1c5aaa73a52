"""Speculative decoding keeps the target's distribution: chi-square over the tokens a verify step produces.

A tiny random Llama with a 64-token vocabulary (weights scaled up so its
distributions are far from uniform) generates, at T = 0.8 with top-p 0.9,
many sequences of one prompt through the real scheduler and runner. A drafter
injected through the runner's drafter interface proposes two drafts after the
first token: a bad one (fixed tokens) or a good one (the target's greedy
continuation). Generated tokens 2 and 3 then come out of one verify step
(position 1 and 2, or a resample after a rejection). Their joint frequency is
compared with the exact distribution computed from transformers' logits on
the same weights; a deliberately broken verifier (ATOM's: accept a draft when
it is the target's argmax) must be rejected by the same test. A random EAGLE
head and a random EAGLE-3 head (drafting from half the vocabulary), whose
drafts come with their distribution, run the general rule through the same test.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from atom_trio.config import EngineConfig
from atom_trio.core.scheduler import Scheduler
from atom_trio.layers.rejection_sampler import RejectionSampler, first_rows
from atom_trio.runner.drafter import Proposal
from atom_trio.sampling_params import SamplingParams
from atom_trio.testing import write_tiny_eagle3_head, write_tiny_eagle_head
from atom_trio.testing.models import TINY_CONFIGS, transformers_config

scipy_stats = pytest.importorskip("scipy.stats")

VOCAB = 64
PROMPT = [3, 17, 42, 8, 25]
TEMPERATURE, TOP_P = 0.8, 0.9
NUM_SAMPLES = 20_000
BATCH = 5_000
PARAMS = SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import transformers

    config = transformers_config(TINY_CONFIGS["llama"], vocab_size=VOCAB, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1, dtype="float32", initializer_range=0.25)
    torch.manual_seed(7)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("spec-vocab64") / "llama"
    model.save_pretrained(path)
    return path, model


@contextlib.contextmanager
def _runner(model_dir: Path, speculative_config: dict):
    from atom_trio.runner import ModelRunner

    # Each verify chunk is one small attention call on the CPU: with one thread they cost 30 times less than
    # with threads fighting over a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model_runner = ModelRunner(
        EngineConfig(
            model=str(model_dir), dtype="float32", num_kv_blocks=BATCH + 8, block_size=16, max_model_len=64,
            max_num_seqs=BATCH, max_num_batched_tokens=BATCH * len(PROMPT), seed=0,
            speculative_config=speculative_config,
        )
    )
    try:
        yield model_runner
    finally:
        model_runner.close()
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runner(model_dir):
    with _runner(model_dir[0], {"method": "ngram", "num_speculative_tokens": 2}) as model_runner:
        yield model_runner


def _target_probs(model, contexts: list[list[int]]) -> torch.Tensor:
    """The request's next-token distribution after each context: softmax(logits / T), then vLLM's top-p."""
    with torch.no_grad():
        logits = model(torch.tensor(contexts)).logits[:, -1].double() / TEMPERATURE
    probs = logits.softmax(-1)
    ascending, order = probs.sort(-1)
    drop = ascending.cumsum(-1) <= 1 - TOP_P
    drop[:, -1] = False
    probs = probs.masked_fill(drop.scatter(1, order, drop), 0.0)
    return probs / probs.sum(-1, keepdim=True)


@pytest.fixture(scope="module")
def exact(model_dir) -> tuple[np.ndarray, dict[int, list[int]]]:
    """P(token 2, token 3) over the vocabulary squared, and the target's greedy two tokens after each first token."""
    model = model_dir[1]
    first = _target_probs(model, [PROMPT])[0]
    second = _target_probs(model, [PROMPT + [t1] for t1 in range(VOCAB)])  # [t1, t2]
    third = _target_probs(model, [PROMPT + [t1, t2] for t1 in range(VOCAB) for t2 in range(VOCAB)])
    joint = (first[:, None, None] * second[:, :, None] * third.view(VOCAB, VOCAB, VOCAB)).sum(0)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + [t1] for t1 in range(VOCAB)])).logits[:, -1]
        d1 = logits.argmax(-1)
        d2 = model(torch.cat([torch.tensor([PROMPT + [t1] for t1 in range(VOCAB)]), d1[:, None]], 1)).logits[:, -1]
    oracle = {t1: [int(d1[t1]), int(d2[t1].argmax())] for t1 in range(VOCAB)}
    return joint.numpy(), oracle


class TableDrafter:
    """Drafts after the first generated token only: ``table[first token]``, or fixed tokens."""

    def __init__(self, table: dict[int, list[int]] | None = None, fixed: list[int] | None = None) -> None:
        self.table, self.fixed = table, fixed

    hidden_window = 0

    def propose(self, requests):
        contexts = [r.context for r in requests]
        return Proposal([
            (self.fixed if self.table is None else self.table[c[-1]]) if len(c) == len(PROMPT) + 1 else []
            for c in contexts
        ], [None] * len(contexts))

    def forget(self, seq_ids):
        pass


class ArgmaxVerifier(RejectionSampler):
    """Broken on purpose: a draft that is the target's argmax is accepted whatever the sample says."""

    def sample(self, logits, requests, draft_token_ids, token_bitmask=None, draft_probs=None):
        tokens, logprobs, top = super().sample(logits, requests, draft_token_ids, token_bitmask, draft_probs)
        argmax = logits.argmax(-1)
        for chunk, row in zip(draft_token_ids, first_rows(draft_token_ids)):
            for i, draft in enumerate(chunk):
                if argmax[row + i] == draft:
                    tokens[row + i] = draft
        return tokens, logprobs, top


def _sample_pairs(runner, num_samples: int = NUM_SAMPLES) -> tuple[np.ndarray, int]:
    """Counts of (token 2, token 3) over ``num_samples`` sequences, and the drafts accepted."""
    counts = np.zeros((VOCAB, VOCAB))
    accepted = 0
    for batch in range(num_samples // BATCH):
        scheduler = Scheduler(
            num_blocks=runner.num_kv_blocks, block_size=16, max_num_seqs=BATCH,
            max_num_batched_tokens=BATCH * len(PROMPT), max_model_len=64, num_speculative_tokens=2,
        )
        outputs: dict[str, list[int]] = {}
        for i in range(BATCH):
            scheduler.add_request(f"{batch}-{i}", PROMPT, PARAMS)
            outputs[f"{batch}-{i}"] = []
        while scheduler.has_unfinished():
            plan = scheduler.schedule()
            for out in scheduler.update(plan, runner.execute(plan)):
                outputs[out.request_id].extend(out.new_token_ids)
        accepted += scheduler.spec_num_accepted_tokens
        for tokens in outputs.values():
            counts[tokens[1], tokens[2]] += 1
    return counts, accepted


def _chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's test of ``counts`` against ``probs``, cells expected under 5 pooled into one."""
    expected = probs.ravel() * counts.sum()
    observed = counts.ravel()
    assert observed[expected == 0].sum() == 0, "a pair the target cannot produce was sampled"
    small = (expected < 5) & (expected > 0)
    big = expected >= 5
    obs = np.append(observed[big], observed[small].sum())
    exp = np.append(expected[big], expected[small].sum())
    return float(scipy_stats.chisquare(obs, exp).pvalue)


@pytest.mark.parametrize("drafter", ["bad", "good"])
def test_verified_tokens_follow_the_target_distribution(runner, exact, drafter) -> None:
    joint, oracle = exact
    runner.drafter = TableDrafter(fixed=[5, 9]) if drafter == "bad" else TableDrafter(table=oracle)
    counts, accepted = _sample_pairs(runner)
    assert accepted > (NUM_SAMPLES // 2 if drafter == "good" else 0)
    assert _chi_square_p(counts, joint) > 1e-3


def test_a_broken_verifier_is_caught(runner, exact) -> None:
    joint, oracle = exact
    runner.drafter = TableDrafter(table=oracle)
    runner.rejection_sampler = ArgmaxVerifier(runner.sampler)
    try:
        counts, _ = _sample_pairs(runner, BATCH)  # fails by far: fewer samples do
    finally:
        runner.rejection_sampler = RejectionSampler(runner.sampler)
    assert _chi_square_p(counts, joint) < 1e-6
    assert math.isfinite(counts.sum())


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_eagle_drafts_keep_the_target_distribution(model_dir, exact, tmp_path, method) -> None:
    """A random EAGLE (-3) head: real draft distributions q, through the literal rule (accepts and rejections)."""
    joint, _ = exact
    write_head = write_tiny_eagle_head if method == "eagle" else write_tiny_eagle3_head
    head = write_head(model_dir[0], tmp_path / "head", seed=1)
    with _runner(model_dir[0], {"method": method, "num_speculative_tokens": 2, "draft_model": str(head)}) as eagle:
        counts, accepted = _sample_pairs(eagle, BATCH)
    assert accepted > 0
    assert _chi_square_p(counts, joint) > 1e-3
