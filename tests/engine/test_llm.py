"""The synchronous `LLM` wrapper: plain function calls, no event loop in the caller."""

from __future__ import annotations

import io

import pytest

from atom_trio import LLM, CompletionOutput, RequestOutput, SamplingParams
from atom_trio.engine.llm import TokenSpeedBar
from atom_trio.outputs import RequestMetrics


def test_llm_generates_complete_outputs_in_prompt_order(default_model_dir, capsys):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    with LLM(model=str(default_model_dir), dtype="float32", num_kv_blocks=128, max_model_len=512) as llm:
        tokenizer = llm.tokenizer
        prompts = ["The capital of France is", "1, 2, 3,", tokenizer.encode("Hello, my name is")]
        batch = llm.generate(prompts, params)
        progress = capsys.readouterr().err
        assert "3/3" in progress  # the batch showed a progress bar
        assert "est. speed input:" in progress and "toks/s" in progress

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


def _delta(prompt_len: int, new_tokens: int) -> RequestOutput:
    return RequestOutput(
        request_id="r",
        prompt=None,
        prompt_token_ids=list(range(prompt_len)),
        outputs=[CompletionOutput(index=0, token_ids=list(range(new_tokens)))],
        finished=False,
        num_cached_tokens=0,
        metrics=RequestMetrics(arrival_time=0.0),
    )


def test_progress_bar_counts_tokens_as_they_arrive_before_any_request_finishes():
    out = io.StringIO()
    with TokenSpeedBar(2, show=True, file=out, mininterval=0) as bar:
        bar.count(_delta(prompt_len=5, new_tokens=1), first=True)
        bar.count(_delta(prompt_len=7, new_tokens=1), first=True)
        bar.count(_delta(prompt_len=5, new_tokens=3), first=False)  # the prompt counts once per request
        assert (bar.prompt_tokens, bar.output_tokens, bar.n) == (12, 5, 0)
        last_draw = out.getvalue().split("\r")[-1]
        assert "0/2" in last_draw and "est. speed input:" in last_draw
        speeds = last_draw.split("est. speed input: ")[1]
        assert float(speeds.split(" toks/s")[0]) > 0 and float(speeds.split("output: ")[1].split(" ")[0]) > 0


def test_progress_bar_off_counts_nothing_and_writes_nothing():
    out = io.StringIO()
    with TokenSpeedBar(1, show=False, file=out) as bar:
        bar.count(_delta(prompt_len=5, new_tokens=1), first=True)
    assert out.getvalue() == "" and bar.output_tokens == 0
