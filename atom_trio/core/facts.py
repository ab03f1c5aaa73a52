"""What the engine needs to know of a loaded model to plan for it."""

from __future__ import annotations

import attrs


@attrs.frozen(kw_only=True)
class ModelFacts:
    """The numbers a runner reports once its model and KV cache are ready; the scheduler is sized from them.

    Under tensor parallelism every rank reports its own and the executor keeps
    rank 0's, with the fewest KV blocks of any rank (every rank must hold the same blocks).
    """

    num_kv_blocks: int
    block_size: int
    max_model_len: int
    """The model's context length, capped by ``--max-model-len``."""
    vocab_size: int
    eos_token_ids: frozenset[int]
    kv_cache_windows: tuple[int | None, ...] = (None,)
    """The KV cache groups (`BlockManager`): ``None`` for full attention, then each sliding window; one group
    (``(None,)``) unless the model's attention layers are of several kinds."""
