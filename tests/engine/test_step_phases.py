"""The engine's and the runner's phase timers on a tiny model: every phase of every step, sane values."""

from __future__ import annotations

import time

import trio

from atom_trio import EngineConfig, SamplingParams, open_engine
from atom_trio.engine.engine import STEP_PHASES
from atom_trio.runner.profiling import RUNNER_PHASES


async def test_phase_timers_cover_every_step_and_fit_in_the_wall_time(tiny_llama_dir):
    config = EngineConfig(
        model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=64, max_model_len=256, executor="thread"
    )
    async with open_engine(config) as engine:
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        start = time.perf_counter()

        async def one(prompt: str) -> None:
            async for _ in engine.generate(prompt, params):
                pass

        async with trio.open_nursery() as nursery:
            for prompt in ("The sea", "A cat", "One two three"):
                nursery.start_soon(one, prompt)
        wall_us = (time.perf_counter() - start) * 1e6
        steps = engine.stats().num_steps
        engine_phases = engine.step_phases()
        runner_phases = engine.executor.runner.phases.summary()

        assert set(engine_phases) <= set(STEP_PHASES) and set(runner_phases) <= set(RUNNER_PHASES)
        # One step at a time on the CPU: each step is scheduled, executed and updated once.
        for phase in ("schedule", "execute", "update"):
            assert engine_phases[phase].count == steps, phase
        assert 1 <= engine_phases["deliver"].count <= steps
        for phase in ("inputs", "forward", "sample"):
            assert runner_phases[phase].count == steps, phase
        for stats in (*engine_phases.values(), *runner_phases.values()):
            assert 0 < stats.median_us <= stats.p90_us <= stats.max_us < wall_us
        # The step loop's phases follow one another, so together they fit in the wall time.
        assert sum(s.mean_us * s.count for name, s in engine_phases.items() if name != "deliver") < wall_us
        # The runner's forward includes its inputs and runs inside the engine's execute.
        assert runner_phases["inputs"].mean_us < runner_phases["forward"].mean_us < engine_phases["execute"].mean_us

        assert engine.step_phases(clear=True) == engine_phases
        assert engine.step_phases() == {}
