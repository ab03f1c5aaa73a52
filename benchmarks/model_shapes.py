"""Hugging Face ``config.json`` contents of real models, for dummy-weight runs at their true sizes.

Real weights can't travel to the GPU machine; ``--load-format dummy`` with one
of these configs gives the same shapes, bytes and FLOPs.
"""

LLAMA_3_1_8B = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
    dtype="bfloat16",
)
QWEN3_0_6B = dict(
    architectures=["Qwen3ForCausalLM"],
    model_type="qwen3",
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    tie_word_embeddings=True,
    bos_token_id=151643,
    eos_token_id=151645,
    dtype="bfloat16",
)
ENGINE_FLAGS = ["--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "4096"]
