"""The scheduler's request counts, under random adds, steps and aborts with few blocks (so preemption happens).

A request is waiting from `add_request` until the first of its sequences is in a plan, then running until
its last sequence ends; the test keeps that record from the plans themselves and compares it after every
operation. The counts are what ``max_queued_requests`` and the ``num_requests_*`` metrics read, so an ``n=8``
request must count once.
"""

from __future__ import annotations

import random

from hypothesis import event, given, settings
from hypothesis import strategies as st

from atom_trio.core.plan import StepResult
from atom_trio.core.scheduler import Scheduler
from atom_trio.sampling_params import SamplingParams

OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 8), st.integers(1, 12), st.integers(1, 6)),
        st.tuples(st.just("step")),
        st.tuples(st.just("step")),  # steps thrice as often: sequences grow until blocks run out
        st.tuples(st.just("step")),
        st.tuples(st.just("abort"), st.integers(0, 40)),
    ),
    min_size=10,
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(operations=OPERATIONS, num_blocks=st.integers(4, 12), max_num_seqs=st.integers(1, 4), seed=st.integers(0, 99))
def test_waiting_and_running_count_requests(operations, num_blocks, max_num_seqs, seed) -> None:
    sched = Scheduler(num_blocks=num_blocks, block_size=2, max_num_seqs=max_num_seqs, max_num_batched_tokens=8,
                      max_model_len=24, eos_token_ids=frozenset({0}))
    rng = random.Random(seed)
    added: list[str] = []
    scheduled: set[str] = set()
    for operation in operations:
        if operation[0] == "add":
            _, n, prompt_len, max_tokens = operation
            request_id = f"r{len(added)}"
            prompt_len = min(prompt_len, sched.max_model_len - 1)  # a prompt must leave room to generate
            sched.add_request(request_id, [rng.randrange(1, 5) for _ in range(prompt_len)],
                              SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=True))
            added.append(request_id)
        elif operation[0] == "step":
            plan = sched.schedule()
            if plan is None:
                continue
            by_seq = {s.seq_id: s.request_id for s in sched.running}
            scheduled.update(by_seq[chunk.seq_id] for chunk in plan.chunks)
            samples = [rng.randrange(1, 5) for chunk in plan.chunks if chunk.sample]
            sched.update(plan, StepResult(step_id=plan.step_id, token_ids=samples, logprobs=[None] * len(samples),
                                          top_logprobs=[None] * len(samples)))
        elif added:
            sched.abort_request(added[operation[1] % len(added)])
        live = {s.request_id for s in sched.running + sched.waiting}
        stats = sched.stats()
        assert stats.num_waiting_requests == len(live - scheduled)
        assert stats.num_running_requests == len(live & scheduled)
        assert (stats.num_running, stats.num_waiting) == (len(sched.running), len(sched.waiting))
        if stats.num_waiting > stats.num_waiting_requests > 0:
            event("waiting sequences outnumber waiting requests")
    if sched.num_preemptions:
        event("preempted")
