"""Turn one step's next-token logits into sampled tokens, with vLLM V1's semantics.

The order of operations is vLLM's, because it decides what a request means:

0. a grammar's token mask (``structured_outputs``: the plan's `TokenBitmask`)
   sets the tokens it forbids to -inf in the logits themselves, before
   anything else reads them, so no later step can bring one back: greedy
   and random rows, min-p, top-k and top-p all see the masked logits, and
   logprobs are the masked distribution's (a forbidden token's is -inf).
   vLLM does the same: its runner masks the logits before calling its
   sampler, whose raw logprobs are then post-mask;
1. logprobs, when asked, come from the *raw* logits (vLLM's default
   ``raw_logprobs``), so they describe the model, not the sampling knobs;
2. min_tokens blocks EOS / stop ids, logit_bias is added;
3. repetition (prompt + output), frequency and presence (output only) penalties;
4. greedy rows take the argmax of those processed logits;
5. the other rows are divided by their temperature, then min-p, top-k and top-p
   cut the candidate set, and a token is drawn by the exponential race:
   ``argmax(probs / Exp(1))`` picks token i with probability ``probs[i]``
   without a multinomial's sort or cumulative sum.

Everything is batched across rows; a row pays only for the features it uses.
A seeded row draws its noise from a generator seeded by (seed, number of tokens
generated so far), so its tokens do not depend on what shares its batch, where
it sits in it, or whether it was preempted and recomputed.

Where the kernel backend has a sampling kernel (`KernelBackend.sample`), and
for at least its `KernelBackend.sampling_min_rows` drawing rows, steps 4-5 run
there: the cut-offs are found by a few passes over each row instead of a
full-vocabulary sort, greedy rows take the argmax in the same launch, and a
seeded row's key is the same ``step_seed``. The per-row knobs reach the
device by pinned, non-blocking copies, so the step's only host sync is the
final read of the tokens (plus the logprobs' when asked). The torch path
stays for the other backends and as the reference.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import attrs
import numpy as np
import torch

from atom_trio._device import host_to_device
from atom_trio.core.plan import TokenBitmask
from atom_trio.ops import KernelBackend, TorchRefBackend
from atom_trio.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


@attrs.frozen
class SampleRequest:
    """One row of the logits: its sampling parameters and its tokens so far."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]


@attrs.frozen
class SamplerOutput:
    """Columnar results, one entry per row; logprob fields are None where not asked."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


def step_seed(seed: int, step: int) -> int:
    """A 64-bit generator seed for a request's `step`-th sampled token.

    SplitMix64 of (seed, step): neighbouring seeds and steps give unrelated
    streams, which a plain ``seed + step`` would not (seed 1 step 0 would
    replay seed 0 step 1).
    """
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _signed64(value: int) -> int:
    """A 64-bit pattern as the int64 a tensor can hold."""
    return value - (1 << 64) if value >= 1 << 63 else value


def first_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` of ``[rows, vocab]`` logits, in two stages where the vocabulary splits evenly.

    torch reduces each row in one thread block, slow for one row of a 128k
    vocabulary next to a batch-1 decode step (docs/kernels.md). Cut into up to 256 equal
    pieces, a row's maximum is found by that many blocks, and the first maximum
    of the first best piece is the row's first maximum: torch's pick, ties included.
    """
    rows, vocab = logits.shape
    pieces = min(256, vocab & -vocab)  # the largest power of two dividing the vocabulary, capped
    if pieces < 16:
        return logits.argmax(dim=-1)
    values, index = logits.reshape(rows, pieces, vocab // pieces).max(dim=-1)
    best = values.argmax(dim=-1, keepdim=True)
    return index.gather(1, best).squeeze(1).add_(best.squeeze(1), alpha=vocab // pieces)


def _row_index(rows: Sequence[int], device: torch.device) -> torch.Tensor:
    """``rows`` as an index tensor on ``device``: indexing a CUDA tensor with a list would copy it with a host sync."""
    return host_to_device(torch.tensor(rows, dtype=torch.long), device)


def _flat_index(rows: Sequence[int], token_lists: Sequence[Sequence[int]], vocab: int, device) -> torch.Tensor:
    """Flat indices ``row * vocab + token`` into a [rows, vocab] tensor.

    Built in numpy, not per token in Python or torch.tensor(list): prompts can
    hold thousands of tokens for each of hundreds of rows, and np.fromiter
    reads them about ten times faster. A row already given as an int64 array
    (the runner keeps each complete prompt as one) is not read again at all.
    """
    lengths = [len(t) for t in token_lists]
    if any(isinstance(t, np.ndarray) for t in token_lists):
        tokens = np.concatenate([t if isinstance(t, np.ndarray) else np.array(t, dtype=np.int64) for t in token_lists])
        tokens = tokens.astype(np.int64, copy=False)
    else:
        tokens = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=sum(lengths))
    tokens += np.repeat(np.asarray(rows, dtype=np.int64) * vocab, lengths)
    return host_to_device(torch.from_numpy(tokens), torch.device(device))


class Sampler:
    """Samples one token per row; see the module docstring for the semantics.

    ``backend``: the kernel backend whose sampling kernel draws, where it has
    one (the runner passes its own; the default, the torch reference, has
    none). ``fused``: None (the default) uses that kernel when at least its
    `KernelBackend.sampling_min_rows` rows draw; True for any number of rows
    (on CPU tensors too, where the backend runs there); False never.
    """

    def __init__(
        self, eos_token_ids: frozenset[int], *, backend: KernelBackend | None = None, fused: bool | None = None
    ):
        self.eos_token_ids = frozenset(eos_token_ids)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._backend = backend if backend is not None else TorchRefBackend()
        self._fused = fused
        if fused and self._backend.sampling_min_rows is None:
            raise ValueError(f"Sampler(fused=True) but kernel backend {self._backend.name!r} has no sampling kernel")

    def __call__(
        self, logits: torch.Tensor, requests: list[SampleRequest], token_bitmask: TokenBitmask | None = None
    ) -> SamplerOutput:
        token_ids, logprobs, top_logprobs = self.sample_on_device(logits, requests, token_bitmask)
        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs, top_logprobs=top_logprobs)

    def sample_on_device(
        self, logits: torch.Tensor, requests: list[SampleRequest], token_bitmask: TokenBitmask | None = None
    ) -> tuple[torch.Tensor, list[float | None], list[list[tuple[int, float]] | None]]:
        """The sampled tokens as an int64 tensor on the logits' device, and the logprob columns.

        Waits for the device only when a row asks for logprobs (they come back as
        Python lists); otherwise the tokens can feed the next step before the host has seen them.
        With ``token_bitmask``, its rows' forbidden tokens are masked in ``logits``
        themselves (float32 logits are written in place).
        """
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(requests)} requests")
        logits, _, token_ids = self.draw(logits, requests, token_bitmask)
        logprobs, top_logprobs = self.token_logprobs(logits, token_ids, requests)
        return token_ids, logprobs, top_logprobs

    def draw(
        self, logits: torch.Tensor, requests: list[SampleRequest], token_bitmask: TokenBitmask | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 0 and 2-5: the float32 (masked) logits, the processed logits and the sampled tokens, all on the device.

        `sample_on_device` without the logprobs: a caller that changes some
        tokens (the rejection sampler) reads the logprobs of its own tokens after.
        """
        logits = logits.float()
        if token_bitmask is not None:
            self._apply_token_bitmask(logits, token_bitmask)
        processed = self.process_logits(logits, requests)
        return logits, processed, self._sample(processed, requests)

    def _apply_token_bitmask(self, logits: torch.Tensor, token_bitmask: TokenBitmask) -> None:
        """Step 0: -inf for every token a constrained row's grammar forbids (the backend's kernel)."""
        device = logits.device
        words = host_to_device(torch.from_numpy(token_bitmask.words), device)
        self._backend.apply_token_bitmask(logits, words, _row_index(token_bitmask.rows, device))

    # -- steps 2-3: logits processors that can change the argmax ----------------------

    def process_logits(self, logits: torch.Tensor, requests: list[SampleRequest]) -> torch.Tensor:
        """Apply min_tokens, logit_bias and the penalties: the logits greedy rows take the argmax of.

        Returns `logits` itself, untouched, when no row needs any of them; never
        writes to `logits`, which logprobs still need raw.
        """
        vocab, device = logits.shape[1], logits.device
        bias_rows = [i for i, r in enumerate(requests) if r.params.logit_bias]
        blocked = {i: self._blocked_ids(r) for i, r in enumerate(requests)}
        blocked = {i: ids for i, ids in blocked.items() if ids}
        penalty_rows = [i for i, r in enumerate(requests) if r.params.penalized]
        if not (bias_rows or blocked or penalty_rows):
            return logits
        out = logits.clone()
        flat = out.view(-1)
        if bias_rows:
            biases = [requests[i].params.logit_bias for i in bias_rows]
            index = _flat_index(bias_rows, [list(b) for b in biases], vocab, device)
            values = host_to_device(torch.tensor([v for b in biases for v in b.values()], dtype=out.dtype), device)
            flat.index_add_(0, index, values)
        if blocked:
            flat.index_fill_(0, _flat_index(list(blocked), list(blocked.values()), vocab, device), -math.inf)
        if penalty_rows:
            self._apply_penalties(out, [requests[i] for i in penalty_rows], penalty_rows)
        return out

    def _blocked_ids(self, request: SampleRequest) -> list[int]:
        params = request.params
        if len(request.output_token_ids) >= params.min_tokens:
            return []
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= self.eos_token_ids
        return sorted(ids)

    @staticmethod
    def _apply_penalties(out: torch.Tensor, requests: list[SampleRequest], rows: list[int]) -> None:
        """HF/vLLM repetition penalty over prompt+output, OpenAI presence/frequency over output."""
        vocab, device = out.shape[1], out.device
        local = range(len(rows))
        whole = len(rows) == out.shape[0]
        row_index = None if whole else host_to_device(torch.tensor(rows), device)
        sub = out if whole else out[row_index]

        def column(values: list[float]) -> torch.Tensor:
            return host_to_device(torch.tensor(values, dtype=sub.dtype), device).unsqueeze(1)

        params = [r.params for r in requests]
        output_index = _flat_index(local, [r.output_token_ids for r in requests], vocab, device)
        counts = torch.zeros_like(sub)
        counts.view(-1).index_add_(0, output_index, torch.ones_like(output_index, dtype=sub.dtype))
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = counts > 0
            prompt_index = _flat_index(local, [r.prompt_token_ids for r in requests], vocab, device)
            seen.view(-1).index_fill_(0, prompt_index, True)
            penalty = column([p.repetition_penalty for p in params]).expand_as(sub)
            scaled = torch.where(sub > 0, sub / penalty, sub * penalty)
            sub = torch.where(seen, scaled, sub)
        if any(p.frequency_penalty for p in params):
            sub = sub - column([p.frequency_penalty for p in params]) * counts
        if any(p.presence_penalty for p in params):
            sub = sub - column([p.presence_penalty for p in params]) * (counts > 0).to(sub.dtype)
        if whole:
            out.copy_(sub)
        else:
            out[row_index] = sub

    # -- steps 4-5: pick the tokens ---------------------------------------------------

    def _sample(self, logits: torch.Tensor, requests: list[SampleRequest]) -> torch.Tensor:
        random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if not random_rows:
            return first_argmax(logits)
        if self._uses_kernel(len(random_rows)):
            return self._sample_fused(logits, requests)
        all_random = len(random_rows) == len(requests)
        random_index = None if all_random else _row_index(random_rows, logits.device)
        x = logits if all_random else logits[random_index]
        probs = self.probs(x, [requests[i].params for i in random_rows])
        noise = self._exponential_noise(probs, [requests[i] for i in random_rows])
        sampled = probs.div_(noise).argmax(dim=-1)
        if all_random:
            return sampled
        tokens = first_argmax(logits)
        tokens[random_index] = sampled
        return tokens

    def probs(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Each row's sampling distribution: softmax after its temperature, min-p, top-k and top-p (step 5).

        ``logits`` are processed ones (`process_logits`) of rows that draw; they
        are not written to. The rejection sampler verifies drafts against these.
        """
        device = logits.device

        def column(values: list[float], dtype=torch.float32) -> torch.Tensor:
            return host_to_device(torch.tensor(values, dtype=dtype), device).unsqueeze(1)

        if any(p.temperature != 1.0 for p in params):
            x = logits / column([p.temperature for p in params])
        else:
            x = logits.clone()  # the filters below write in place
        if any(p.min_p > 0 for p in params):
            # probs < min_p * max_prob  <=>  logit < max_logit + log(min_p); no softmax needed.
            # min_p = 0 gives a threshold of -inf, which removes nothing.
            threshold = x.amax(dim=-1, keepdim=True) + torch.log(column([p.min_p for p in params]))
            x.masked_fill_(x < threshold, -math.inf)
        self._top_k(x, params)
        self._top_p(x, params)
        return x.softmax(dim=-1)

    def _uses_kernel(self, num_random_rows: int) -> bool:
        if self._fused is not None:
            return self._fused
        min_rows = self._backend.sampling_min_rows
        return min_rows is not None and num_random_rows >= min_rows

    def _sample_fused(self, logits: torch.Tensor, requests: list[SampleRequest]) -> torch.Tensor:
        """All rows in one launch: greedy rows (temperature 0 there) take the argmax, the others draw.

        A seeded row's key is ``step_seed(seed, tokens generated)``, as the
        torch path seeds its generator; unseeded rows take a key from the
        device's default generator, so ``torch.manual_seed`` still governs them.
        """
        params = [r.params for r in requests]
        vocab = logits.shape[1]
        knobs = torch.tensor(
            [
                [0.0 if p.greedy else p.temperature for p in params],
                [p.top_p for p in params],
                [p.min_p for p in params],
            ],
            dtype=torch.float32,
        )
        seeded = [p.seed is not None for p in params]
        integers = torch.tensor(
            [
                [p.top_k if 0 < p.top_k < vocab else 0 for p in params],
                [
                    _signed64(step_seed(p.seed, len(r.output_token_ids))) if p.seed is not None else 0
                    for p, r in zip(params, requests)
                ],
                seeded,
            ],
            dtype=torch.int64,
        )
        knobs, integers = host_to_device(knobs, logits.device), host_to_device(integers, logits.device)
        seeds = integers[1]
        if not all(seeded):
            drawn = torch.empty_like(seeds).random_()
            seeds = drawn if not any(seeded) else torch.where(integers[2].bool(), seeds, drawn)
        return self._backend.sample(logits, knobs[0], integers[0], knobs[1], knobs[2], seeds)

    @staticmethod
    def _top_k(x: torch.Tensor, params: list[SamplingParams]) -> None:
        """Keep logits >= each row's k-th largest; torch.topk instead of sorting the vocabulary."""
        vocab = x.shape[1]
        ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        rows = [i for i, k in enumerate(ks) if k]
        if not rows:
            return
        index = None if len(rows) == len(params) else _row_index(rows, x.device)
        sub = x if index is None else x[index]
        k = host_to_device(torch.tensor([ks[i] for i in rows], dtype=torch.long), x.device).unsqueeze(1)
        kth = sub.topk(max(ks), dim=-1).values.gather(1, k - 1)
        masked = sub.masked_fill(sub < kth, -math.inf)
        if index is None:
            x.copy_(masked)
        else:
            x[index] = masked

    @staticmethod
    def _top_p(x: torch.Tensor, params: list[SamplingParams]) -> None:
        """vLLM's nucleus: drop the least likely tokens whose total mass is at most 1 - p."""
        rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
        if not rows:
            return
        index = None if len(rows) == len(params) else _row_index(rows, x.device)
        sub = x if index is None else x[index]
        top_p = host_to_device(torch.tensor([params[i].top_p for i in rows], dtype=x.dtype), x.device).unsqueeze(1)
        ascending, order = sub.sort(dim=-1)
        tail_mass = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = tail_mass <= 1.0 - top_p
        drop[:, -1] = False  # the most likely token always survives
        masked = sub.masked_fill(drop.scatter(1, order, drop), -math.inf)
        if index is None:
            x.copy_(masked)
        else:
            x[index] = masked

    def _exponential_noise(self, probs: torch.Tensor, requests: list[SampleRequest]) -> torch.Tensor:
        """Exp(1) noise per row: the default RNG for unseeded rows, a per-step seeded stream otherwise."""
        noise = torch.empty_like(probs)
        seeded = [i for i, r in enumerate(requests) if r.params.seed is not None]
        if len(seeded) < len(requests):
            if seeded:
                unseeded = _row_index([i for i, r in enumerate(requests) if r.params.seed is None], probs.device)
                noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_()
            else:
                noise.exponential_()
        if seeded:
            generator = self._generator(probs.device)
            for i in seeded:
                request = requests[i]
                generator.manual_seed(step_seed(request.params.seed, len(request.output_token_ids)))
                noise[i].exponential_(generator=generator)
        # Exp(1) may round to 0 in float32; a tiny floor keeps probs / noise finite and 0 / noise at 0.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        return generator

    # -- logprobs ----------------------------------------------------------------------

    @staticmethod
    def token_logprobs(
        logits: torch.Tensor, token_ids: torch.Tensor, requests: list[SampleRequest]
    ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
        """The sampled token's logprob and the top-N, from the raw (unprocessed) logits."""
        logprobs: list[float | None] = [None] * len(requests)
        top_logprobs: list[list[tuple[int, float]] | None] = [None] * len(requests)
        rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        if not rows:
            return logprobs, top_logprobs
        all_rows = len(rows) == len(requests)
        index = None if all_rows else _row_index(rows, logits.device)
        raw = (logits if all_rows else logits[index]).log_softmax(dim=-1)
        chosen = token_ids if all_rows else token_ids[index]
        sampled = raw.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
        n_max = min(max(requests[i].params.logprobs for i in rows), raw.shape[1])
        values, indices = raw.topk(n_max, dim=-1) if n_max else (raw[:, :0], raw[:, :0].long())
        values, indices = values.tolist(), indices.tolist()
        for j, i in enumerate(rows):
            n = requests[i].params.logprobs
            logprobs[i] = sampled[j]
            top_logprobs[i] = list(zip(indices[j][:n], values[j][:n]))
        return logprobs, top_logprobs
