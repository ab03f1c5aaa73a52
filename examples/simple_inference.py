"""Answer a few chat questions with the offline `atom_trio.LLM` API.

    python examples/simple_inference.py                          # the built-in default model
    python examples/simple_inference.py "Why is the sky blue?" --max-tokens 128
    python examples/simple_inference.py --model path/to/hf-dir-or.gguf --temperature 0.7
"""

from __future__ import annotations

import argparse

import atom_trio

DEFAULT_QUESTIONS = [
    "What is the capital of Japan?",
    "What is the capital of Germany?",
    "Give me three tips for staying focused while studying.",
    "Explain in one sentence what a CPU does.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="*", help="questions to ask (default: a few chat questions)")
    parser.add_argument("--model", default=None, help="HF model directory, .gguf file or hub id (default: built-in)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    questions = args.prompts or DEFAULT_QUESTIONS
    # A small KV cache: this script never holds more than a few short sequences.
    with atom_trio.LLM(model=args.model, dtype=args.dtype, seed=args.seed, num_kv_blocks=256) as llm:
        tokenizer = llm.tokenizer
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
            for q in questions
        ]
        params = atom_trio.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        for question, output in zip(questions, llm.generate(prompts, params, use_tqdm=False)):
            completion = output.outputs[0]
            print(f"Q: {question}\nA: {completion.text.strip()}\n   ({len(completion.token_ids)} tokens, "
                  f"{completion.finish_reason})\n")


if __name__ == "__main__":
    main()
