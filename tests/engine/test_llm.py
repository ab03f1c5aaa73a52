"""The synchronous `LLM` wrapper: plain function calls, no event loop in the caller."""

from __future__ import annotations

import pytest

from atom_trio import LLM, SamplingParams


def test_llm_generates_complete_outputs_in_prompt_order(default_model_dir, capsys):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    with LLM(model=str(default_model_dir), dtype="float32", num_kv_blocks=128, max_model_len=512) as llm:
        tokenizer = llm.tokenizer
        prompts = ["The capital of France is", "1, 2, 3,", tokenizer.encode("Hello, my name is")]
        batch = llm.generate(prompts, params)
        progress = capsys.readouterr().err
        assert "3/3" in progress  # the batch showed a progress bar

        assert len(batch) == len(prompts)
        for prompt, result in zip(prompts, batch, strict=True):
            assert result.finished
            expected_ids = prompt if isinstance(prompt, list) else tokenizer.encode(prompt)
            assert result.prompt_token_ids == expected_ids
            assert result.prompt == (None if isinstance(prompt, list) else prompt)
            (completion,) = result.outputs
            assert len(completion.token_ids) == 6 and completion.finish_reason == "length"
            assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)

        # one prompt at a time gives the same greedy tokens as the batch; per-prompt params are honoured
        (alone,) = llm.generate(prompts[1], params)
        assert alone.outputs[0].token_ids == batch[1].outputs[0].token_ids
        short, longer = llm.generate(prompts[:2], [SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), params])
        assert short.outputs[0].token_ids == batch[0].outputs[0].token_ids[:2]
        assert longer.outputs[0].token_ids == batch[1].outputs[0].token_ids

        with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
            llm.generate(prompts, [params, params])
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate("again", params)
