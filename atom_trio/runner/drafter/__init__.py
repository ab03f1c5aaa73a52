"""Drafters for speculative decoding: what proposes the tokens the target then verifies.

A drafter sees, for each sequence that asks (`SeqChunk.propose_drafts`), its
tokens so far, including the ones just sampled, and (if its
``hidden_window`` is not 0) the target's last hidden states of the positions
just verified, and proposes up to ``num_speculative_tokens`` tokens to follow
them, with the distribution each was drawn from. The runner calls it once per
step, after reading the sampled tokens, and sends the drafts back with the
step's result; the scheduler plans them as the sequence's next verify chunk,
and the runner hands their distributions to the verifier.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Drafter, DraftRequest, Proposal, hidden_rows
from .eagle import EagleDrafter
from .ngram import NgramDrafter

if TYPE_CHECKING:
    from atom_trio.runner.model_runner import ModelRunner


def make_drafter(runner: ModelRunner) -> Drafter:
    """The drafter of the runner's ``speculative_config.method``: prompt lookup, or a draft head (EAGLE, EAGLE-3, MTP)."""
    config = runner.config.speculative_config
    if config.method == "ngram":
        return NgramDrafter(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method in ("eagle", "eagle3", "mtp"):
        return EagleDrafter(runner)
    raise ValueError(f"no drafter for speculative method {config.method!r}")


__all__ = ["DraftRequest", "Drafter", "EagleDrafter", "NgramDrafter", "Proposal", "hidden_rows", "make_drafter"]
