"""EAGLE, EAGLE-3 and MTP drafting: a draft head reads the target's hidden states and runs ``k`` autoregressive steps.

The three differ only in their head (`atom_trio.models.eagle`,
`atom_trio.models.eagle3`, `atom_trio.models.deepseek_mtp`) and in what of
the target it reads: EAGLE and MTP its last hidden states, EAGLE-3 the
inputs of three of its layers (`tap_target` has the target return them).
The MTP layer ships in the target's own checkpoint; the EAGLE heads are
``draft_model``.

The draft's KV cache is the simplest one that is correct whatever the
scheduler does: none is kept between steps. Each proposal recomputes the
head over a short window, the last ``hidden_window`` positions whose target
hidden states the drafter has seen (kept per sequence on the device, a few
KB a token), into a scratch paged cache of its own, ``blocks_per_row`` blocks
for each row of the batch, then runs the ``k - 1`` further steps on top of it.
So rejected drafts, preemption, recompute and the prefix cache need no
bookkeeping on the draft's side (a window that does not continue the kept one
simply starts again), and the scratch cache is the same small size whatever
the context length; the price is attention over at most ``hidden_window``
positions, which bounds what the head sees of long contexts, and the
window's recompute each step (a few dozen tokens through one layer). A
head with a paged cache sharing the target's block tables would avoid both
and is the next step when drafting cost shows up in profiles.

Each draft is drawn from ``q = softmax(logits / T)`` at its row's temperature
(the argmax for greedy rows, whose ``q`` the verifier ignores), with noise
from the row's seed and the draft's output index (`row_keys` with
`DRAFT_SALT`), and ``q`` goes to the verifier with the drafts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import attrs
import safetensors
import torch

from atom_trio._device import host_to_device
from atom_trio.errors import ModelLoadError
from atom_trio.layers import CachedAttention, ForwardContext, forward_context
from atom_trio.layers.rejection_sampler import DRAFT_SALT, counter_uniform, exponential_race, row_keys
from atom_trio.layers.sampler import SampleRequest, first_argmax
from atom_trio.loader.resolve import resolve_model
from atom_trio.loader.weights import DUMMY_WEIGHT_RANGE, safetensors_files
from atom_trio.models.registry import MODEL_REGISTRY
from atom_trio.ops import AttentionMetadata
from atom_trio.runner import startup
from atom_trio.runner.kv_cache import KVCacheLayout

from .base import DraftRequest, Proposal

if TYPE_CHECKING:
    from atom_trio.runner.model_runner import ModelRunner

logger = logging.getLogger("atom_trio.runner")

#: The registry's class for each method's draft head (the head's config.json names another architecture).
DRAFT_ARCHITECTURES = {"eagle": "EagleLlamaForCausalLM", "eagle3": "Eagle3LlamaForCausalLM", "mtp": "DeepseekMTP"}
#: The targets whose checkpoints carry MTP layers this build drafts with.
MTP_TARGETS = ("DeepseekV3ForCausalLM",)


class EagleDrafter:
    """Drafts with the head of ``speculative_config.method`` (see `load_draft_head`), sharing the runner's target."""

    hidden_window = 64

    def __init__(self, runner: ModelRunner) -> None:
        spec = runner.config.speculative_config
        self.num_tokens = spec.num_speculative_tokens
        self.device = runner.device
        self.backend = runner.backend
        self.block_size = runner.block_size
        self.model = load_draft_head(runner)
        if spec.method == "eagle3":
            tap_target(runner, self.model.config)
        self.max_position = self.model.config.max_position_embeddings
        self.blocks_per_row = -(-(self.hidden_window + self.num_tokens) // self.block_size)
        self.kv_layout = KVCacheLayout(
            layers=[m for m in self.model.modules() if isinstance(m, CachedAttention)],
            block_size=self.block_size,
            dtype=runner.dtype,
            device=self.device,
        )
        self.kv_cache = self.kv_layout.allocate(runner.config.max_num_seqs * self.blocks_per_row)
        self._windows: dict[int, tuple[int, torch.Tensor]] = {}
        """Per sequence: the position after its last kept hidden state, and the kept ones (at most the window)."""

    def forget(self, seq_ids: Iterable[int]) -> None:
        for seq_id in seq_ids:
            self._windows.pop(seq_id, None)

    @torch.inference_mode()
    def propose(self, requests: Sequence[DraftRequest]) -> Proposal:
        token_ids: list[list[int]] = [[] for _ in requests]
        draft_probs: list[torch.Tensor | None] = [None] * len(requests)
        drafting = [(i, w) for i, r in enumerate(requests) if (w := self._window(r)) is not None]
        if not drafting:
            return Proposal(token_ids, draft_probs)
        rows = [requests[i] for i, _ in drafting]
        tokens, probs = self._draft(rows, [w for _, w in drafting])
        for (i, _), drafts, row in zip(drafting, tokens.tolist(), range(len(rows))):
            token_ids[i] = drafts
            draft_probs[i] = None if probs is None or requests[i].params.greedy else probs[row]
        return Proposal(token_ids, draft_probs)

    def _window(self, request: DraftRequest) -> torch.Tensor | None:
        """The request's hidden states, the new ones after the kept ones where they continue them (None: none)."""
        end = len(request.context) - 1  # hidden states run up to the position before the last token
        new = request.hidden_states
        kept = self._windows.get(request.seq_id)
        if new is None or not len(new):
            return kept[1] if kept is not None and kept[0] == end else None
        if kept is not None and kept[0] == end - len(new):
            new = torch.cat([kept[1], new])
        window = new[-self.hidden_window :]
        self._windows[request.seq_id] = (end, window)
        return window

    def _draft(
        self, requests: list[DraftRequest], windows: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[rows, k]`` draft tokens and their ``[rows, k, vocab]`` distributions (None when every row is greedy)."""
        lengths = [len(w) for w in windows]
        ends = [len(r.context) - 1 for r in requests]
        span = self.blocks_per_row * self.block_size
        input_ids = [t for r, n, end in zip(requests, lengths, ends) for t in r.context[end - n + 1 : end + 1]]
        positions = [p for n, end in zip(lengths, ends) for p in range(end - n, end)]
        slots = [row * span + i for row, n in enumerate(lengths) for i in range(n)]
        block_tables = torch.arange(len(requests) * self.blocks_per_row, dtype=torch.int32, device=self.device)
        block_tables = block_tables.view(len(requests), self.blocks_per_row)
        hidden = self._run(
            torch.tensor(input_ids), positions, torch.cat(windows), lengths, lengths, slots, block_tables
        )
        last = hidden[host_to_device(torch.tensor(lengths).cumsum(0) - 1, self.device)]
        samples = [r.sample_request for r in requests]
        tokens, probs = [], []
        for step in range(self.num_tokens):
            token, q = self._sample(self.model.compute_logits(last).float(), samples, step)
            tokens.append(token)
            probs.append(q)
            if step + 1 == self.num_tokens:
                break
            last = self._run(
                token,
                [min(end + step, self.max_position - 1) for end in ends],
                last,
                [1] * len(requests),
                [n + step + 1 for n in lengths],
                [row * span + n + step for row, n in enumerate(lengths)],
                block_tables,
            )
        return torch.stack(tokens, 1), None if probs[0] is None else torch.stack(probs, 1)

    def _run(
        self,
        input_ids: torch.Tensor,
        positions: list[int],
        hidden: torch.Tensor,
        query_lens: list[int],
        context_lens: list[int],
        slots: list[int],
        block_tables: torch.Tensor,
    ) -> torch.Tensor:
        """The head over one flat batch in its scratch cache: its output hidden state for every token."""
        device = self.device
        cu_seqlens = [0]
        for n in query_lens:
            cu_seqlens.append(cu_seqlens[-1] + n)
        metadata = AttentionMetadata(
            cu_seqlens_q=host_to_device(torch.tensor(cu_seqlens, dtype=torch.int32), device),
            context_lens=host_to_device(torch.tensor(context_lens, dtype=torch.int32), device),
            block_tables=block_tables,
            slot_mapping=host_to_device(torch.tensor(slots, dtype=torch.long), device),
            query_lens_host=query_lens,
            context_lens_host=context_lens,
            block_size=self.block_size,
        )
        context = ForwardContext(metadata=metadata, attn_plan=self.backend.plan_attention(metadata))
        with forward_context(context):
            return self.model(
                input_ids.to(device), host_to_device(torch.tensor(positions, dtype=torch.long), device), hidden
            )

    @staticmethod
    def _sample(
        logits: torch.Tensor, requests: list[SampleRequest], step: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each row's draft ``step``: drawn from softmax(logits / T) (greedy rows: the argmax); and that softmax."""
        greedy = [r.params.greedy for r in requests]
        if all(greedy):
            return first_argmax(logits), None
        device = logits.device
        temperatures = torch.tensor([1.0 if g else r.params.temperature for g, r in zip(greedy, requests)])
        probs = (logits / host_to_device(temperatures, device).unsqueeze(1)).softmax(dim=-1)
        keys = row_keys(requests, DRAFT_SALT, device, offsets=[step] * len(requests))
        tokens = exponential_race(probs, counter_uniform(keys, probs.shape[1]))
        if any(greedy):
            tokens = torch.where(host_to_device(torch.tensor(greedy), device), first_argmax(logits), tokens)
        return tokens, probs


def load_draft_head(runner: ModelRunner) -> torch.nn.Module:
    """The draft head of ``runner.config.speculative_config``, built and loaded like the target, sharing what it lacks.

    EAGLE heads come from ``draft_model``; MTP layers from the target's own
    checkpoint (quantized as the target is).

    Raises:
        ModelLoadError: the head does not fit the target (hidden size, vocabulary, architecture) or cannot be read.
    """
    config = runner.config
    spec = config.speculative_config
    if spec.method == "mtp":
        if not set(getattr(runner.hf_config, "architectures", None) or ()) & set(MTP_TARGETS):
            raise ModelLoadError(
                f"method 'mtp' drafts with the multi-token-prediction layers of {', '.join(MTP_TARGETS)} "
                f"checkpoints; the target is {getattr(runner.hf_config, 'architectures', None)}"
            )
        draft_config = attrs.evolve(config, speculative_config=None)
    else:
        draft_config = attrs.evolve(
            config, model=spec.draft_model, revision=None, quantization=None, speculative_config=None
        )
    resolved = resolve_model(draft_config)
    hf_config = resolved.hf_config
    target = runner.hf_config
    for name in ("hidden_size", "vocab_size"):
        if getattr(hf_config, name, None) != getattr(target, name):
            raise ModelLoadError(
                f"draft model {spec.draft_model}: {name} {getattr(hf_config, name, None)} differs from the target's "
                f"{getattr(target, name)}"
            )
    embed_tokens = getattr(getattr(runner.model, "model", None), "embed_tokens", None)
    if embed_tokens is None:
        raise ModelLoadError(f"method {spec.method!r} needs a target with an input embedding at model.embed_tokens")
    stored: set[str] = set()
    if resolved.load_format == "safetensors":
        for file in safetensors_files(resolved.path):
            with safetensors.safe_open(file, framework="pt") as f:
                stored |= set(f.keys())
    head_class = MODEL_REGISTRY[DRAFT_ARCHITECTURES[spec.method]]
    hf_config.shared_with_target = head_class.shared_with(hf_config, stored)  # all of SHAREABLE for dummy weights
    hf_config.architectures = [DRAFT_ARCHITECTURES[spec.method]]
    resolved = attrs.evolve(resolved, dtype=runner.dtype)
    model = startup.build_model(
        resolved, runner.device, runner.backend, level=0, tp_group=runner.tp_group, expert_parallel=False
    )
    if resolved.load_format == "dummy":  # transformers has no model of a head to draw a made-up checkpoint from
        _fill_dummy(model, config.seed)
    else:
        startup.load_weights(model, resolved, seed=config.seed, device=runner.device, level=0, progress=False)
    model.share_target(embed_tokens, runner.model.compute_logits)
    logger.info("draft head %s (%s), sharing the target's %s", resolved.path, spec.method,
                ", ".join(hf_config.shared_with_target) or "nothing")
    return model


def tap_target(runner: ModelRunner, head_config) -> None:
    """Have the target's forward also return the inputs of the layers an EAGLE-3 head reads (before compiling).

    The head's ``eagle_aux_hidden_state_layer_ids`` name them, else the
    target's default choice (`eagle3_aux_hidden_state_layers`).

    Raises:
        ModelLoadError: the target cannot return them, or the layers are not three of the target's.
    """
    target = runner.model
    if not hasattr(target, "set_aux_hidden_state_layers"):
        raise ModelLoadError(
            f"method 'eagle3' reads the inputs of three target layers, and {type(target).__name__} does not return "
            "them (set_aux_hidden_state_layers)"
        )
    layers = tuple(getattr(head_config, "eagle_aux_hidden_state_layer_ids", None) or
                   target.eagle3_aux_hidden_state_layers())
    num_layers = runner.hf_config.num_hidden_layers
    if len(layers) != 3 or not all(0 <= i < num_layers for i in layers):
        raise ModelLoadError(
            f"EAGLE-3 head: eagle_aux_hidden_state_layer_ids {list(layers)} must be three layers of the target's "
            f"{num_layers}"
        )
    target.set_aux_hidden_state_layers(layers)


@torch.no_grad()
def _fill_dummy(model: torch.nn.Module, seed: int) -> None:
    """Weights as ``--load-format dummy`` makes them (norms 1, the rest small uniform), laid out for the kernels."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if not param.is_floating_point():  # EAGLE-3's d2t: zeros, the draft vocabulary's first tokens
            continue
        if "norm" in name:
            param.fill_(1.0)
        else:
            param.uniform_(-DUMMY_WEIGHT_RANGE, DUMMY_WEIGHT_RANGE, generator=generator)
    model.eval()
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
