"""The default model (SmolLM2-135M-Instruct) quantized in the test: it still answers, and its activation-quantized
formats keep transformers' top-1 token on the dequantized weights (teacher-forced, over 581 positions of prose) on the
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

TEXTS = (
    "The city of Kyoto was the capital of Japan for more than a thousand years, from 794 until the emperor moved "
    "to Tokyo in 1869. Its temples, shrines and gardens survived the Second World War largely intact, and today "
    "the city is known for its wooden machiya houses, its geisha district of Gion, and the thousands of vermilion "
    "torii gates that climb the hill behind the Fushimi Inari shrine. Visitors come in spring for the cherry "
    "blossoms along the Philosopher's Path and in autumn for the red maple leaves at Tofuku-ji. The city's "
    "cuisine, kaiseki, is a sequence of small seasonal dishes, and its tofu and pickles are famous across the "
    "country. Kyoto University, founded in 1897, has produced many Nobel laureates in physics and chemistry.",
    "The Amazon river carries more water than any other river on Earth, draining a basin that covers almost forty "
    "percent of South America. Its rainforest is home to millions of species of insects, plants, birds and "
    "mammals, many of which have never been described by scientists. Every year the river floods the surrounding "
    "forest for several months, and fish swim among the roots of the trees to eat fallen fruit and seeds. "
    "Indigenous peoples have lived along its banks for thousands of years, fishing, hunting and growing cassava "
    "in small clearings. Today roads, cattle ranches and soybean farms are pushing deeper into the forest, and "
    "scientists warn that large parts of it could turn into dry savanna.",
    "Johann Sebastian Bach was born in Eisenach in 1685 into a family of musicians. He worked as an organist and "
    "choir director in several German towns before settling in Leipzig, where he spent the last twenty-seven "
    "years of his life as cantor of the St. Thomas School. There he wrote a new cantata almost every week for the "
    "city's churches, as well as the St. Matthew Passion and the Mass in B minor. His keyboard works, such as the "
    "Well-Tempered Clavier and the Goldberg Variations, are still studied by every pianist. After his death his "
    "music was largely forgotten until Felix Mendelssohn conducted the St. Matthew Passion in Berlin in 1829.",
    "To bake a simple loaf of bread, mix five hundred grams of flour with ten grams of salt and seven grams of "
    "dried yeast. Add about three hundred and fifty millilitres of warm water and stir until a rough dough forms. "
    "Knead it on a floured table for ten minutes, until it is smooth and springs back when you press it with a "
    "finger. Put the dough in an oiled bowl, cover it with a cloth and leave it somewhere warm for an hour, until "
    "it has doubled in size. Then shape it into a loaf, let it rise again for half an hour and bake it at two "
    "hundred and twenty degrees for thirty to thirty-five minutes.",
)
"""Natural prose (the agreement is measured over all of it: 581 teacher-forced positions). One text's 130-170
positions move the rate by 0.6% a position, and which near-ties flip changes with the last bit of a scale."""

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
    # INT8 W8A8 recipes smooth the activations first (llm-compressor's SmoothQuant, strength 0.8).
    "ct-int8": lambda src, dst: write_compressed_tensors(
        src, dst, "INT8", calibration_ids=tuple(calibration_ids(src)), smoothing_strength=0.8
    ),
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
# measured over the 581 positions: 93.6% FP8 per 1 x 128 group, 94.7% FP8 per token, 93.8% FP8 static per
# tensor, 94.7% INT8 per token after SmoothQuant (the prompts in 256-token chunks, which sum in another
# order: 94.5%, 94.0%, 94.0%, 94.8%). Rounding each activation to e4m3's 3 mantissa bits with no scale at all
# (no range limit) also gives 93.6% with the FP8-block weights: FP8's shortfall from 95% on SmolLM2-135M is
# the format's rounding, not its scales (docs/models.md).
AGREEMENT = {"fp8-block": 0.93, "ct-fp8-dynamic": 0.93, "fp8-tensor-static": 0.93, "ct-int8": 0.94}


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
    fields = dict(dtype="float32", kernel_backend=backend, device=device, num_kv_blocks=64, max_num_batched_tokens=1024)
    with LLM(model=str(model_dir), **fields) as llm:
        prompts = [llm.tokenizer.encode(text) for text in TEXTS]
        outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    reference = reference_model(default_model_dir, dequantized)
    same = []
    for ids, out in zip(prompts, outs, strict=True):
        ours = [max(position, key=position.get) for position in out.prompt_logprobs[1:]]
        with torch.no_grad():
            theirs = reference(torch.tensor([ids])).logits[0, :-1].argmax(-1)
        same += [a == b for a, b in zip(ours, theirs.tolist(), strict=True)]
    assert len(same) > 500
    agreement = sum(same) / len(same)
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
