"""Draft heads (EAGLE, EAGLE-3, MTP) through the whole engine: outputs are the target's whatever the drafts.

Each method drafts on tiny targets with tiny heads in their published layouts
(`atom_trio.testing.eagle`): a random head, whose drafts are mostly rejected,
and a copy head on a target that mostly repeats itself, whose drafts are
mostly accepted. EAGLE and EAGLE-3 draft for a tiny Llama, MTP with the layer
written into a tiny DeepSeek-V3's checkpoint. Greedy outputs must be the
plain engine's, with synchronous and asynchronous scheduling, and seeded
sampled requests must not depend on their batch mates. What each head
computes is checked against transformers in the method's own test module
(test_spec_eagle.py, test_spec_eagle3.py, test_spec_mtp.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from atom_trio import LLM, SamplingParams
from atom_trio.testing import (
    write_echo_target,
    write_tiny_eagle3_head,
    write_tiny_eagle_head,
    write_tiny_model_dir,
    write_tiny_mtp_target,
)

ENGINE = {"dtype": "float32", "num_kv_blocks": 64, "max_model_len": 256, "seed": 0}
PROMPTS = ["The quick brown fox jumps over", "Once upon a time there was a", "1, 2, 3, 4,"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
METHODS = ["eagle", "eagle3", "mtp"]


@pytest.fixture(scope="module")
def heads(tiny_llama_dir, default_model_dir, tmp_path_factory) -> dict[tuple[str, str], tuple[Path, dict]]:
    """By (method, head kind): the target, and the speculative config that drafts for it."""
    root = tmp_path_factory.mktemp("heads")
    echo = write_echo_target(tiny_llama_dir, root / "echo")
    deepseek = write_tiny_model_dir("deepseek_v3", root, default_model_dir)
    deepseek_echo = write_echo_target(deepseek, root / "deepseek-echo")
    found = {}
    for method, write in (("eagle", write_tiny_eagle_head), ("eagle3", write_tiny_eagle3_head)):
        for kind, target in (("random", tiny_llama_dir), ("copy", echo)):
            head = write(target, root / f"{method}-{kind}", copy=kind == "copy")
            found[method, kind] = target, {"method": method, "num_speculative_tokens": 3, "draft_model": str(head)}
    mtp = {"method": "mtp", "num_speculative_tokens": 3}
    found["mtp", "random"] = write_tiny_mtp_target(deepseek, root / "mtp-random"), mtp
    found["mtp", "copy"] = write_tiny_mtp_target(deepseek_echo, root / "mtp-copy", copy=True), mtp
    return found


@pytest.fixture(scope="module")
def plain_outputs():
    """The plain engine's greedy tokens for ``PROMPTS``, by target (each computed once)."""
    found: dict[Path, list[list[int]]] = {}

    def outputs(target: Path) -> list[list[int]]:
        if target not in found:
            with LLM(str(target), **ENGINE) as plain:
                found[target] = _tokens(plain, PROMPTS, GREEDY)
        return found[target]

    return outputs


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("kind", ["random", "copy"])
@pytest.mark.parametrize("method", METHODS)
def test_greedy_outputs_equal_the_plain_engine(heads, plain_outputs, method, kind) -> None:
    target, spec = heads[method, kind]
    with LLM(str(target), speculative_config=spec, **ENGINE) as llm:
        assert _tokens(llm, PROMPTS, GREEDY) == plain_outputs(target)
        stats = llm.stats()
    assert stats.spec_num_drafts > 0
    if kind == "copy":
        assert stats.spec_num_accepted_tokens > 0


@pytest.mark.parametrize("method", METHODS)
def test_asynchronous_scheduling_carries_the_drafts_and_their_hidden_states(heads, plain_outputs, method) -> None:
    target, spec = heads[method, "copy"]
    with LLM(str(target), speculative_config=spec, async_scheduling=True, **ENGINE) as llm:
        assert _tokens(llm, PROMPTS, GREEDY) == plain_outputs(target)
        assert llm.stats().spec_num_accepted_tokens > 0


@pytest.mark.parametrize("method", METHODS)
def test_seeded_sampling_reproduces_whatever_the_batch_mates(heads, method) -> None:
    target, spec = heads[method, "copy"]
    seeded = SamplingParams(temperature=0.8, top_p=0.95, seed=99, max_tokens=24, ignore_eos=True)
    mates = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    with LLM(str(target), speculative_config=spec, **ENGINE) as llm:
        alone = _tokens(llm, PROMPTS[:1], seeded)[0]
        crowded = llm.generate(PROMPTS + PROMPTS[:1], [mates, seeded, mates, seeded], use_tqdm=False)
        assert crowded[3].outputs[0].token_ids == alone
        assert llm.stats().spec_num_accepted_tokens > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("level", [0, 3], ids=["eager", "compiled"])
@pytest.mark.parametrize("method", METHODS)
def test_greedy_outputs_equal_the_plain_engine_on_the_gpu(heads, method, level) -> None:
    """On the GPU (Triton kernels; at level 3 a compiled target, which returns EAGLE-3's taps), in float32."""
    target, spec = heads[method, "copy"]
    fields = {**ENGINE, "device": "cuda", "level": level}
    with LLM(str(target), **fields) as plain:
        expected = _tokens(plain, PROMPTS, GREEDY)
    with LLM(str(target), speculative_config=spec, **fields) as llm:
        assert _tokens(llm, PROMPTS, GREEDY) == expected
        assert llm.stats().spec_num_accepted_tokens > 0
