"""The default model (SmolLM2-135M-Instruct) quantized in the test: it still answers, and its activation-quantized
formats keep transformers' top-1 token on the dequantized weights (teacher-forced, over 150+ positions) on the
torch reference backend (activations rounded as the GPU kernels round them) and on the CPU backend.
"""

from __future__ import annotations

import pytest
import torch

from atom_trio.engine import LLM
from atom_trio.sampling_params import SamplingParams
from atom_trio.testing.quantize import (
    calibrate_input_amax,
    reference_model,
    write_compressed_tensors,
    write_quantized,
)

TEXT = (
    "The city of Kyoto was the capital of Japan for more than a thousand years, from 794 until the emperor moved "
    "to Tokyo in 1869. Its temples, shrines and gardens survived the Second World War largely intact, and today "
    "the city is known for its wooden machiya houses, its geisha district of Gion, and the thousands of vermilion "
    "torii gates that climb the hill behind the Fushimi Inari shrine. Visitors come in spring for the cherry "
    "blossoms along the Philosopher's Path and in autumn for the red maple leaves at Tofuku-ji. The city's "
    "cuisine, kaiseki, is a sequence of small seasonal dishes, and its tofu and pickles are famous across the "
    "country. Kyoto University, founded in 1897, has produced many Nobel laureates in physics and chemistry."
)

CALIBRATION_TEXT = (
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light into chemical "
    "energy. In the chloroplasts, chlorophyll absorbs red and blue light; water is split, oxygen is released, "
    "and the energy is stored in ATP and NADPH, which the Calvin cycle then uses to fix carbon dioxide into sugar."
)


def calibration_ids(model_dir):
    """Static activation scales come from natural text (not the text the agreement is measured on)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(model_dir).encode(CALIBRATION_TEXT)


WRITERS = {
    "fp8-block": lambda src, dst: write_quantized(src, dst, "fp8", block_size=(128, 128)),
    "fp8-tensor-static": lambda src, dst: write_quantized(
        src, dst, "fp8", input_amax=calibrate_input_amax(reference_model(src, {}), calibration_ids(src))
    ),
    "ct-fp8-dynamic": lambda src, dst: write_compressed_tensors(src, dst, "FP8_DYNAMIC"),
    "ct-int8": lambda src, dst: write_compressed_tensors(src, dst, "INT8"),
    "gptq-4bit": lambda src, dst: write_quantized(src, dst, "gptq", group_size=64, sym=True),
}


@pytest.fixture(scope="module")
def quantized_default(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("quantized-default")
    made = {}

    def get(name):
        if name not in made:
            made[name] = (root / name, WRITERS[name](default_model_dir, root / name))
        return made[name]

    return get


# The least top-1 agreement with rounded activations (the torch reference backend), a little under what was
# measured over these 170 positions: 92.9-95% with FP8 per 1 x 128 group (it moves with the last bit of the
# scale's rounding: a few positions are near-ties), 93.5% FP8 per token, 92.4% FP8 static per tensor, 89.4%
# INT8 per token. Per-token and per-tensor scales round SmolLM2-135M's ordinary channels coarsely beside its
# few outlier channels (the outlier problem SmoothQuant names), INT8's fixed steps more than FP8's.
AGREEMENT = {"fp8-block": 0.92, "ct-fp8-dynamic": 0.92, "fp8-tensor-static": 0.9, "ct-int8": 0.87}


ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize(
    ("fmt", "backend"),
    [
        *((fmt, "torch") for fmt in AGREEMENT),
        ("fp8-block", "cpu"),
        ("ct-int8", "cpu"),
        *(pytest.param(fmt, "triton", marks=ON_GPU) for fmt in AGREEMENT),
    ],
)
def test_activation_quantized_formats_keep_the_top_token(quantized_default, default_model_dir, fmt, backend):
    """The CPU dequantizes at load (activations unrounded): there the top token is transformers' at 99%.

    On a GPU (the Triton kernels, float32 activations) the floors are the torch reference's, which the
    kernels are tested against.
    """
    model_dir, dequantized = quantized_default(fmt)
    device = "cuda" if backend == "triton" else "cpu"
    fields = dict(dtype="float32", kernel_backend=backend, device=device, num_kv_blocks=32, max_num_batched_tokens=256)
    with LLM(model=str(model_dir), **fields) as llm:
        ids = llm.tokenizer.encode(TEXT)
        assert len(ids) > 150
        out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    ours = [max(position, key=position.get) for position in out.prompt_logprobs[1:]]
    with torch.no_grad():
        theirs = reference_model(default_model_dir, dequantized)(torch.tensor([ids])).logits[0, :-1].argmax(-1)
    agreement = sum(a == b for a, b in zip(ours, theirs.tolist(), strict=True)) / len(ours)
    assert agreement >= (0.99 if backend == "cpu" else AGREEMENT[fmt]), agreement


@pytest.mark.parametrize("fmt", ["fp8-block", "gptq-4bit"])
def test_the_quantized_default_model_still_answers(quantized_default, fmt):
    model_dir, _ = quantized_default(fmt)
    with LLM(model=str(model_dir), num_kv_blocks=32, max_num_batched_tokens=256) as llm:
        prompt = llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of Japan?"}], add_generation_prompt=True, tokenize=False
        )
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)[0]
    assert "Tokyo" in out.outputs[0].text
