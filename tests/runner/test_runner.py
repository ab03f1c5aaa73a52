"""The model runner driven by hand-built step plans, against transformers' ``generate``.

`MiniScheduler` is a deliberately tiny stand-in for the real scheduler: a
shuffled free list of blocks, prompts that arrive at given steps, prefills
split into chunks of a given size, and decodes of every running sequence in
the same plans. Greedy tokens must equal transformers' token for token.
"""

from __future__ import annotations

import random

import attrs
import pytest
import torch
import transformers

from atom_trio.config import EngineConfig
from atom_trio.core.plan import SeqChunk, StepPlan
from atom_trio.sampling_params import SamplingParams
from atom_trio.runner import ModelRunner
from atom_trio.testing import transformers_greedy


@attrs.define
class Request:
    prompt: list[int]
    params: SamplingParams  # greedy; generation stops at params.max_tokens
    arrival_step: int = 0
    chunk_size: int | None = None  # None: the whole prompt in one chunk


@attrs.define
class _Seq:
    seq_id: int
    request: Request
    tokens: list[int]
    num_computed: int = 0
    blocks: list[int] = attrs.field(factory=list)

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.request.prompt) :]


class MiniScheduler:
    """Just enough scheduling to exercise the runner: arrivals, chunked prefill, decodes, block reuse."""

    def __init__(self, requests: list[Request], *, num_blocks: int, block_size: int, seed: int = 0) -> None:
        self.pending = sorted(enumerate(requests), key=lambda r: r[1].arrival_step)
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.block_size = block_size
        self.running: list[_Seq] = []
        self.done: dict[int, _Seq] = {}
        self.finished_ids: list[int] = []
        self.step = 0

    def has_work(self) -> bool:
        return bool(self.pending or self.running)

    def schedule(self) -> StepPlan:
        while self.pending and self.pending[0][1].arrival_step <= self.step:
            seq_id, request = self.pending.pop(0)
            self.running.append(_Seq(seq_id, request, list(request.prompt)))
        chunks = []
        for seq in self.running:
            prompt_len = len(seq.request.prompt)
            if seq.num_computed < prompt_len:
                size = seq.request.chunk_size or prompt_len
                new = seq.tokens[seq.num_computed : seq.num_computed + size]
            else:
                new = seq.tokens[-1:]
            end = seq.num_computed + len(new)
            while len(seq.blocks) * self.block_size < end:
                seq.blocks.append(self.free_blocks.pop())
            sample = end >= prompt_len
            chunks.append(
                SeqChunk(
                    seq_id=seq.seq_id,
                    token_ids=new,
                    start_pos=seq.num_computed,
                    block_table=list(seq.blocks),
                    prompt_len=prompt_len,
                    sample=sample,
                    sampling_params=seq.request.params if sample else None,
                )
            )
        plan = StepPlan(step_id=self.step, chunks=chunks, finished_seq_ids=self.finished_ids)
        self.finished_ids = []
        self.step += 1
        return plan

    def update(self, plan: StepPlan, token_ids: list[int]) -> None:
        sampled = iter(token_ids)
        by_id = {seq.seq_id: seq for seq in self.running}
        for chunk in plan.chunks:
            seq = by_id[chunk.seq_id]
            seq.num_computed += len(chunk.token_ids)
            if chunk.sample:
                seq.tokens.append(next(sampled))
                if len(seq.output) >= seq.request.params.max_tokens:
                    self.running.remove(seq)
                    self.free_blocks.extend(seq.blocks)  # later sequences reuse them: stale KV must not leak
                    self.done[seq.seq_id] = seq
                    self.finished_ids.append(seq.seq_id)
        assert next(sampled, None) is None


def run_to_completion(runner: ModelRunner, requests: list[Request], *, num_blocks: int) -> list[list[int]]:
    scheduler = MiniScheduler(requests, num_blocks=num_blocks, block_size=runner.block_size)
    mixed_steps = 0
    while scheduler.has_work():
        plan = scheduler.schedule()
        if plan.chunks:
            kinds = {len(c.token_ids) == 1 and c.start_pos >= c.prompt_len for c in plan.chunks}
            mixed_steps += kinds == {True, False}
        result = runner.execute(plan)
        assert result.step_id == plan.step_id
        assert len(result.token_ids) == sum(c.sample for c in plan.chunks)
        scheduler.update(plan, result.token_ids)
    assert mixed_steps > 0, "the schedule should mix prefill chunks and decodes in one step"
    return [scheduler.done[i].output for i in range(len(requests))]


def mixed_requests(prompts: list[list[int]], max_tokens: int, repetition_penalty: float = 1.0) -> list[Request]:
    """Batched whole prompts, chunked prefills, late arrivals and early finishers, all overlapping."""
    shapes = [
        dict(arrival_step=0),
        dict(arrival_step=0, max_tokens=max_tokens // 2),
        dict(arrival_step=0, chunk_size=5),
        dict(arrival_step=2, chunk_size=3),
        dict(arrival_step=3),
        dict(arrival_step=max_tokens // 2 + 1, chunk_size=4),
    ]
    requests = []
    for prompt, shape in zip(prompts, shapes, strict=True):
        shape = dict(shape)
        n = shape.pop("max_tokens", max_tokens)
        params = SamplingParams(temperature=0.0, max_tokens=n, repetition_penalty=repetition_penalty)
        requests.append(Request(prompt=prompt, params=params, **shape))
    return requests


def check_greedy_matches_transformers(
    model_dir, prompts, *, max_tokens, block_size, num_blocks, repetition_penalty=1.0
):
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    runner = ModelRunner(
        EngineConfig(model=str(model_dir), dtype="float32", num_kv_blocks=num_blocks, block_size=block_size)
    )
    try:
        requests = mixed_requests(prompts, max_tokens, repetition_penalty)
        outputs = run_to_completion(runner, requests, num_blocks=num_blocks)
    finally:
        runner.close()
    distinct = set()
    for request, output in zip(requests, outputs):
        expected = transformers_greedy(hf, request.prompt, request.params.max_tokens, repetition_penalty)
        # transformers stops at EOS; the runner (max_tokens only) must agree up to there
        assert output[: len(expected)] == expected
        distinct.update(expected)
    assert len(distinct) > 3 * len(requests), "a degenerate reference would hardly test attention"


@pytest.mark.parametrize("arch", ["llama", "llama3", "qwen3"])
def test_tiny_model_greedy_matches_transformers(tiny_model_dirs, arch):
    # Random tiny models with tied embeddings tend to repeat one token forever, which would
    # match whatever attention computed; a repetition penalty (the same in both engines)
    # keeps the greedy path moving, so every step's argmax depends on the context.
    rng = random.Random(1)
    prompts = [[rng.randrange(1, 49152) for _ in range(n)] for n in (9, 17, 23, 11, 6, 14)]
    check_greedy_matches_transformers(
        tiny_model_dirs[arch], prompts, max_tokens=12, block_size=4, num_blocks=64, repetition_penalty=2.0
    )


CHAT_QUESTIONS = [
    "What is the capital of Japan?",
    "What is the capital of Germany?",
    "Name three primary colours.",
    "How many legs does a spider have?",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
]


def test_default_model_greedy_matches_transformers(default_model_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for q in CHAT_QUESTIONS
    ]
    check_greedy_matches_transformers(default_model_dir, prompts, max_tokens=16, block_size=16, num_blocks=48)


@pytest.fixture(scope="module")
def tiny_runner(tiny_model_dirs):
    runner = ModelRunner(
        EngineConfig(model=str(tiny_model_dirs["llama"]), dtype="float32", num_kv_blocks=32, block_size=4)
    )
    yield runner
    runner.close()


def greedy_chunk(seq_id, tokens, start, *, blocks, prompt_len=None, prefix=None):
    return SeqChunk(
        seq_id=seq_id,
        token_ids=tokens,
        start_pos=start,
        block_table=blocks,
        prompt_len=prompt_len if prompt_len is not None else start + len(tokens),
        sample=True,
        sampling_params=SamplingParams(temperature=0.0),
        prefix_token_ids=prefix,
    )


def test_runner_attributes(tiny_runner):
    assert tiny_runner.block_size == 4 and tiny_runner.num_kv_blocks == 32
    assert tiny_runner.max_model_len == tiny_runner.hf_config.max_position_embeddings
    assert tiny_runner.vocab_size == tiny_runner.hf_config.vocab_size
    assert tiny_runner.eos_token_ids == {tiny_runner.hf_config.eos_token_id}
    layer_shape = tiny_runner.backend.kv_cache_shape(32, 4, 2, 16)  # 2 layers, 2 KV heads of 16 dims
    assert tiny_runner.kv_cache.shape == (2, 2, *layer_shape)


def test_injected_fault_raises_once(tiny_runner, inject_step_fault):
    plan = StepPlan(step_id=7, chunks=[greedy_chunk(100, [5, 6, 7], 0, blocks=[0])], finished_seq_ids=[])
    inject_step_fault(tiny_runner, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        tiny_runner.execute(plan)
    assert tiny_runner.execute(plan).step_id == 7
    tiny_runner.execute(StepPlan(step_id=8, chunks=[], finished_seq_ids=[100]))


def test_bad_chunks_raise_clear_errors(tiny_runner):
    def run(*chunks):
        return tiny_runner.execute(StepPlan(step_id=0, chunks=list(chunks)))

    with pytest.raises(ValueError, match="cannot hold 5 tokens"):
        run(greedy_chunk(200, [1, 2, 3, 4, 5], 0, blocks=[0]))
    with pytest.raises(ValueError, match="prefix_token_ids"):
        run(greedy_chunk(201, [1], 9, blocks=[0, 1, 2]))
    with pytest.raises(ValueError, match="past max_model_len"):
        run(greedy_chunk(202, [1], tiny_runner.max_model_len, blocks=list(range(32))))
    with pytest.raises(ValueError, match="one chunk per sequence"):
        run(greedy_chunk(204, [1], 0, blocks=[0]), greedy_chunk(204, [2], 1, blocks=[0]))
    # a rejected plan changes nothing: sequence 205's first chunk is not recorded when 206's is refused
    with pytest.raises(ValueError, match="prefix_token_ids"):
        run(greedy_chunk(205, [1, 2], 0, blocks=[0]), greedy_chunk(206, [1], 3, blocks=[0]))
    with pytest.raises(ValueError, match="prefix_token_ids"):
        run(greedy_chunk(205, [3], 2, blocks=[0]))


def test_history_reaches_the_sampler_across_preemption(tiny_runner):
    """A re-admitted sequence brings its prefix; the sampler sees prompt and output split at prompt_len.

    A negative presence penalty lifts only tokens already *generated*, so the
    greedy pick reveals whether the runner's history put 16 and 17 (and only
    them) in the output.
    """
    prompt = [11, 12, 13, 14, 15]
    plain = tiny_runner.compute_logits(
        StepPlan(step_id=0, chunks=[greedy_chunk(300, prompt + [16, 17], 0, blocks=[0, 1], prompt_len=5)])
    )[0]
    tiny_runner.execute(StepPlan(step_id=1, chunks=[], finished_seq_ids=[300]))
    # the same sequence after "preemption", its first 6 tokens' KV still cached in blocks 0 and 1
    chunk = attrs.evolve(
        greedy_chunk(301, [17], 6, blocks=[0, 1], prompt_len=5, prefix=prompt + [16]),
        sampling_params=SamplingParams(temperature=0.0, presence_penalty=-2.0),
    )
    result = tiny_runner.execute(StepPlan(step_id=2, chunks=[chunk]))
    boosted = plain.clone()
    boosted[[16, 17]] += 2.0
    assert int(plain.argmax()) not in (16, 17)
    assert result.token_ids == [int(boosted.argmax())]


def test_dummy_weights_load_format(tiny_model_dirs):
    runner = ModelRunner(
        EngineConfig(model=str(tiny_model_dirs["qwen3"]), load_format="dummy", num_kv_blocks=8, block_size=16)
    )
    try:
        logits = runner.compute_logits(StepPlan(step_id=0, chunks=[greedy_chunk(0, [1, 2, 3], 0, blocks=[0])]))
        assert logits.shape == (1, runner.vocab_size) and torch.isfinite(logits).all()
    finally:
        runner.close()


def test_kv_cache_sized_from_cpu_budget(tiny_model_dirs):
    runner = ModelRunner(
        EngineConfig(model=str(tiny_model_dirs["llama"]), dtype="float32", cpu_kv_cache_space_gb=0.001)
    )
    try:
        # 2 (K and V) x 2 layers x 16 tokens x 2 KV heads x 16 dims x 4 bytes = 8 KiB per block
        assert runner.num_kv_blocks == int(0.001 * 2**30) // 8192
    finally:
        runner.close()


@pytest.mark.parametrize("chunk_size", [None, 5, 1], ids=["one-chunk", "chunks-of-5", "chunks-of-1"])
def test_prompt_logprobs_match_transformers(tiny_runner, tiny_model_dirs, chunk_size):
    """Every prompt token's logprob and top alternatives equal transformers' log_softmax, however the prefill is split.

    Another sequence (not asking) shares the first plan: its column entry is
    None, and a plan where nobody asks has no column at all.
    """
    rng = random.Random(2)
    prompt = [rng.randrange(1, 49152) for _ in range(13)]
    num_top = 3
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0].float().log_softmax(dim=-1)

    params = SamplingParams(temperature=0.0, prompt_logprobs=num_top)
    other = greedy_chunk(401, [7, 8, 9], 0, blocks=[20])
    entries, step, start = [], 0, 0
    while start < len(prompt):
        end = len(prompt) if chunk_size is None else min(len(prompt), start + chunk_size)
        chunk = SeqChunk(
            seq_id=400,
            token_ids=prompt[start:end],
            start_pos=start,
            block_table=[0, 1, 2, 3],
            prompt_len=len(prompt),
            sample=end == len(prompt),
            sampling_params=params,
            prefix_token_ids=[] if start == 0 else None,
        )
        chunks = [other, chunk] if step == 0 else [chunk]
        result = tiny_runner.execute(StepPlan(step_id=step, chunks=chunks))
        assert len(result.prompt_logprobs) == len(chunks) and result.prompt_logprobs[-1] is not None
        assert step > 0 or result.prompt_logprobs[0] is None
        entries.extend(result.prompt_logprobs[-1])
        step, start = step + 1, end
    decode = tiny_runner.execute(StepPlan(step_id=step, chunks=[chunk.next_decode(result.token_ids[0])]))
    assert decode.prompt_logprobs is None
    tiny_runner.execute(StepPlan(step_id=step + 1, chunks=[], finished_seq_ids=[400, 401]))

    assert len(entries) == len(prompt) and entries[0] is None
    for pos in range(1, len(prompt)):
        row = expected[pos - 1]
        (token, logprob), *top = entries[pos]
        assert token == prompt[pos]
        assert logprob == pytest.approx(float(row[token]), abs=1e-4)
        values, indices = row.topk(num_top)
        assert [t for t, _ in top] == indices.tolist()
        assert [lp for _, lp in top] == pytest.approx(values.tolist(), abs=1e-4)
