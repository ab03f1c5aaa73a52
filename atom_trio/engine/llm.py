"""`LLM`: the engine for scripts and notebooks, without async.

The engine is a trio program; `LLM` runs it on a background thread
(``trio.run`` there, the engine opened once and kept) and hands each
`generate` call to it with `trio.from_thread.run`. So the model loads once
per `LLM`, not once per call, and the caller's thread needs no event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import trio
from tqdm.auto import tqdm

from atom_trio.config import EngineConfig

from .engine import AsyncEngine, _lone_errors_unwrapped, open_engine
from atom_trio.outputs import EngineStats, RequestOutput
from atom_trio.sampling_params import SamplingParams

PromptLike = str | Sequence[int]


class LLM:
    """Offline generation: ``LLM(model=..., **fields).generate(prompts, params)``.

    ``fields`` are `EngineConfig` fields. Call `close` (or use ``with``) to
    release the model before the object goes away.
    """

    def __init__(self, model: str | None = None, **fields: Any) -> None:
        self.config = EngineConfig(model=model, **fields)
        self._engine: AsyncEngine | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._serve, ready), name="atom-trio LLM", daemon=True)
        self._thread.start()
        ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    async def _serve(self, ready: threading.Event) -> None:
        try:
            async with open_engine(self.config) as engine:
                self._engine, self._token, self._stop = engine, trio.lowlevel.current_trio_token(), trio.Event()
                ready.set()
                await self._stop.wait()
        except BaseException as exc:  # handed to the thread that called __init__, or lost with the engine
            if not ready.is_set():
                self._error = exc
        finally:
            ready.set()

    @property
    def tokenizer(self) -> Any:
        return self._running_engine().tokenizer

    def generate(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); one complete `RequestOutput` per prompt, in order.

        ``params`` is one `SamplingParams` for all prompts or one per prompt.
        A progress bar (requests finished, prompt and output tokens per second)
        is shown for more than one prompt unless ``use_tqdm=False``.
        """
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        elif len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        engine = self._running_engine()
        return trio.from_thread.run(
            _generate_all, engine, prompts, list(params), use_tqdm and len(prompts) > 1, trio_token=self._token
        )

    def stats(self) -> EngineStats:
        """The engine's counters (`AsyncEngine.stats`), read on its thread."""
        engine = self._running_engine()
        return trio.from_thread.run_sync(engine.stats, trio_token=self._token)

    def close(self) -> None:
        """Stop the engine and release the model."""
        if self._stop is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join()
        self._engine = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _running_engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("this LLM has been closed")
        return self._engine


async def _generate_all(
    engine: AsyncEngine, prompts: list[PromptLike], params: list[SamplingParams], show_progress: bool
) -> list[RequestOutput]:
    results: list[RequestOutput | None] = [None] * len(prompts)
    # Keep at most max_queued_requests outstanding, so a big batch queues here instead of being refused.
    limiter = trio.CapacityLimiter(engine.config.max_queued_requests)
    with TokenSpeedBar(len(prompts), show=show_progress) as bar:

        async def run_one(i: int) -> None:
            async with limiter:
                async with engine.generate(prompts[i], params[i]) as stream:
                    async for delta in stream:
                        bar.count(delta, first=results[i] is None)
                        if results[i] is None:
                            results[i] = delta
                        else:
                            results[i].add(delta)  # type: ignore[union-attr]
            bar.update()

        with _lone_errors_unwrapped():
            async with trio.open_nursery() as nursery:
                for i in range(len(prompts)):
                    nursery.start_soon(run_one, i)
    return results  # type: ignore[return-value]


class TokenSpeedBar(tqdm):
    """Finished requests out of a batch, with the prompt and output tokens per second so far (vLLM's wording).

    The speeds change with every delta, so a batch whose requests all finish
    together still shows its progress while it generates; tqdm redraws at
    most every ``mininterval`` seconds however often they change.
    """

    def __init__(self, total: int, *, show: bool, **bar_options: Any) -> None:
        super().__init__(total=total, desc="Processed prompts", unit="req", disable=not show, **bar_options)
        self.prompt_tokens = self.output_tokens = 0
        if not self.disable:  # a disabled tqdm has no clock
            self.set_postfix_str(self._speeds(), refresh=False)

    def count(self, delta: RequestOutput, *, first: bool) -> None:
        """Count ``delta``'s new tokens (and its prompt's, on a request's ``first`` delta) and show the speeds."""
        if self.disable:
            return
        if first:
            self.prompt_tokens += len(delta.prompt_token_ids)
        self.output_tokens += sum(len(c.token_ids) for c in delta.outputs)
        self.set_postfix_str(self._speeds(), refresh=False)
        self.update(0)  # redraws when mininterval has passed

    def _speeds(self) -> str:
        elapsed = max(self.format_dict["elapsed"], 1e-9)
        return (
            f"est. speed input: {self.prompt_tokens / elapsed:.2f} toks/s, "
            f"output: {self.output_tokens / elapsed:.2f} toks/s"
        )
