"""Llama 2 / 3 / 3.1 (and look-alikes such as SmolLM2), written once against ``layers``.

Module names mirror Hugging Face's (``model.layers.N.self_attn.o_proj`` ...)
so that checkpoints map by name; only the packed projections differ, and
`LlamaForCausalLM.packed_modules` says how their shards stack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from atom_trio.errors import ModelLoadError
from atom_trio.layers import (
    Attention,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    get_rope,
)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    """Self-attention; ``qk_norm`` adds Qwen3's per-head RMSNorm of queries and keys before the rotation.

    ``attention_bias`` gives q/k/v and o biases; ``o_proj_bias=False`` keeps o without one (GLM-4-MoE).
    """

    def __init__(
        self, config, rotary_emb: RotaryEmbedding, *, qk_norm: bool = False, o_proj_bias: bool | None = None
    ) -> None:
        super().__init__()
        head_dim = _head_dim(config)
        self.head_dim = head_dim
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_dim, config.num_attention_heads, config.num_key_value_heads, bias=bias
        )
        # This rank's share of the heads (all of them on a single rank).
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * head_dim, config.hidden_size, bias=bias if o_proj_bias is None else o_proj_bias
        )
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5, rotary_emb)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.qk_norm = qk_norm

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, input_norm: RMSNorm | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of ``input_norm(hidden + residual)`` (no norm when None: EAGLE's first draft layer); returns it with ``hidden + residual``."""
        if input_norm is None:
            residual = hidden if residual is None else hidden + residual
            qkv = self.qkv_proj(residual)
        else:
            qkv, residual = self.qkv_proj.forward_normed(input_norm, hidden, residual)
        q, k, v = self.qkv_proj.split(qkv)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.o_proj(self.attn(positions, q, k, v)), residual


class LlamaMLP(nn.Module):
    """SiLU-gated MLP of ``intermediate_size`` features (default: the config's).

    A mixture-of-experts model's shared expert is one, with ``reduce_results=False``: its partial sum
    joins the routed experts' before the layer's one all-reduce.
    """

    def __init__(self, config, intermediate_size: int | None = None, *, reduce_results: bool = True) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only 'silu')")
        bias = getattr(config, "mlp_bias", False)
        intermediate_size = config.intermediate_size if intermediate_size is None else intermediate_size
        # silu(gate) * up comes out of gate_up_proj, which may fuse it into its matmul.
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [intermediate_size] * 2, bias=bias, silu_and_mul=True
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, config.hidden_size, bias=bias, reduce_results=reduce_results
        )

    def forward(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP of ``norm(x + residual)``; returns it with ``x + residual``."""
        activated, residual = self.gate_up_proj.forward_normed(norm, x, residual)
        return self.down_proj(activated), residual

    def forward_normed_input(self, normed: torch.Tensor) -> torch.Tensor:
        """The MLP of an input already normed (a shared expert reads what the router reads)."""
        return self.down_proj(self.gate_up_proj(normed))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention, then the MLP: any module called as ``mlp(x, residual, norm)`` like `LlamaMLP`."""

    def __init__(self, config, self_attn: LlamaAttention, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual stream travels beside the hidden state so that each add fuses
        # into the RMSNorm that follows it, and both into the projection after that.
        hidden, residual = self.self_attn(positions, hidden, residual, self.input_layernorm)
        return self.mlp(hidden, residual, self.post_attention_layernorm)


class LlamaModel(nn.Module):
    """Embedding, ``make_layer(rotary_emb, layer_index)`` for each layer, final norm."""

    def __init__(self, config, make_layer: Callable[[RotaryEmbedding, int], nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # One cos/sin table for all layers: at 128k positions it is tens of MB.
        rotary_emb = get_rope(config, _head_dim(config), config.max_position_embeddings)
        self.layers = nn.ModuleList(make_layer(rotary_emb, index) for index in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.aux_hidden_state_layers: tuple[int, ...] = ()
        """Layers whose input (the residual stream) `forward` also returns, concatenated in this order: EAGLE-3's taps."""

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The final hidden states; with ``aux_hidden_state_layers``, also the tapped ones, ``[tokens, taps * hidden]``.

        The taps are outputs, not hooks, so that a compiled forward (set the layers before compiling) keeps them.
        """
        hidden = self.embed_tokens(input_ids)
        residual = None
        taps = {}
        for index, layer in enumerate(self.layers):
            if index in self.aux_hidden_state_layers:
                taps[index] = hidden if residual is None else hidden + residual
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        if not taps:
            return hidden
        return hidden, torch.cat([taps[index] for index in self.aux_hidden_state_layers], dim=-1)


class LlamaForCausalLM(nn.Module):
    """Causal LM: ``forward`` gives final hidden states for the flat batch, `compute_logits` the vocabulary scores."""

    qk_norm = False
    # Checkpoint tensors (name suffixes) that stay float32 on their way to the model, whatever its dtype.
    keep_in_float32: tuple[str, ...] = ()
    # Hugging Face shard name -> (our packed module, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.decoder_layer)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def decoder_layer(self, rotary_emb: RotaryEmbedding, index: int) -> nn.Module:
        """Layer ``index``; a variant changes its attention or its MLP (Qwen3's q/k norms, experts)."""
        attention = LlamaAttention(self.config, rotary_emb, qk_norm=self.qk_norm)
        return LlamaDecoderLayer(self.config, attention, LlamaMLP(self.config))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.model(input_ids, positions)

    def set_aux_hidden_state_layers(self, layers: tuple[int, ...]) -> None:
        """Have `forward` also return these layers' inputs (`LlamaModel.aux_hidden_state_layers`), before compiling."""
        self.model.aux_hidden_state_layers = tuple(layers)

    def eagle3_aux_hidden_state_layers(self) -> tuple[int, ...]:
        """The low, middle and high layers an EAGLE-3 head reads when its config names none (vLLM's choice)."""
        num_layers = len(self.model.layers)
        return (2, num_layers // 2, num_layers - 3)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the parameters, stacking packed shards.

        Raises `ModelLoadError` for a tensor that fits no parameter and for a
        parameter (or packed shard) the checkpoint never filled, so a naming
        mismatch cannot leave uninitialised weights behind.
        """
        params = dict(self.named_parameters())  # a tied LM head appears once, as the embedding
        loaded: set[tuple[str, object]] = set()
        for name, tensor in weights:
            if (found := self.checkpoint_target(name)) is None:
                continue
            target, shard_id = found
            param = params.get(target)
            if param is None:
                raise ModelLoadError(f"checkpoint tensor {name!r} matches no parameter of {type(self).__name__}")
            loader = getattr(param, "weight_loader", _copy_whole)
            try:
                loader(param, tensor, shard_id)
            except ValueError as exc:
                raise ModelLoadError(f"checkpoint tensor {name!r}: {exc}") from exc
            loaded |= self.filled_keys(target, shard_id)
        missing = sorted(f"{n}[{s}]" if s is not None else n for n, s in self._expected_keys(params) - loaded)
        if missing:
            raise ModelLoadError(f"the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    def checkpoint_target(self, name: str) -> tuple[str, object] | None:
        """The parameter a checkpoint tensor fills and its shard id (None: all of it); None to skip the tensor."""
        if "rotary_emb.inv_freq" in name or (self.tie_word_embeddings and name == "lm_head.weight"):
            return None
        for hf_name, (packed_name, packed_shard) in self.packed_modules.items():
            if f".{hf_name}." in name:
                return name.replace(f".{hf_name}.", f".{packed_name}."), packed_shard
        return name, None

    def filled_keys(self, target: str, shard_id: object) -> set[tuple[str, object]]:
        """The ``(parameter, shard id)`` pairs one loaded tensor fills (more than one for a stacked tensor)."""
        return {(target, shard_id)}

    def _expected_keys(self, params: dict[str, nn.Parameter]) -> set[tuple[str, object]]:
        shards: dict[str, list[object]] = {}
        for packed_name, shard_id in self.packed_modules.values():
            shards.setdefault(packed_name, []).append(shard_id)
        return {(name, shard) for name in params for shard in shards.get(name.split(".")[-2], [None])}


def _copy_whole(param: nn.Parameter, tensor: torch.Tensor, shard_id: object = None) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"shape {tuple(tensor.shape)} does not fit parameter {tuple(param.shape)}")
    param.data.copy_(tensor)
