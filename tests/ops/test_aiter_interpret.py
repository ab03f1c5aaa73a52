"""The aiter backend's AITER Triton kernels on the CPU, under Triton's interpreter, against the torch reference.

The kernels load through `atom_trio.ops.aiter.loader` (AITER's ``__init__``
never runs) with the NVIDIA compatibility module answering the device
queries, exactly as on an NVIDIA GPU. Triton picks the interpreter when a
kernel is defined, so the cases run in a subprocess with
``TRITON_INTERPRET=1`` (`test_the_kernels_under_the_interpreter`) and skip
anywhere else; the GPU's run of the same kernels is tests/gpu/test_gpu_aiter.py. A tiny
Qwen3 runs through the runner on the backend too, in float32 against the torch backend.
Not here: the GEMMs (``gemm_a16w16``, ``gemm_a8w8_blockscale``), which the
interpreter refuses: without split-K their wrappers pass a split-K stride of 0
where the kernels state ``tl.assume(stride_ck > 0)``, which the interpreter
checks and a GPU compile only takes as a hint.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from triton_interpreter import INTERPRET, assert_passes_under_the_interpreter

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("aiter") is None, reason="amd-aiter is not installed"
)
interpreted = pytest.mark.skipif(not INTERPRET, reason="runs in test_the_kernels_under_the_interpreter's subprocess")

DTYPE = torch.float16  # the interpreter's bfloat16 tl.dot reads raw bits as integers


@pytest.fixture(scope="module")
def backend():
    from atom_trio.ops.aiter import AiterBackend

    return AiterBackend("cpu")


@pytest.mark.skipif(INTERPRET, reason="starts the interpreter run")
def test_the_kernels_under_the_interpreter():
    assert_passes_under_the_interpreter(__file__, "not under_the_interpreter", timeout=600)


@interpreted
def test_the_kernels_load_without_running_aiters_init(backend):
    from atom_trio.ops.aiter import nvidia

    assert getattr(sys.modules["aiter"], "__file__", None) is None  # the loader's stand-in package
    assert sys.modules["aiter.ops.triton.utils._triton.arch_info"] is nvidia
    assert sys.modules["aiter.ops.triton.utils.types"].e4m3_dtype == torch.float8_e4m3fn


@interpreted
@pytest.mark.parametrize("shape", [(5, 48), (3, 4, 32)], ids=["tokens", "heads"])
def test_rms_norm(backend, shape):
    from test_triton_ops import REF, TOLERANCE

    gen = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(*shape, generator=gen).to(DTYPE) for _ in range(2))
    weight = torch.randn(shape[-1], generator=gen).to(DTYPE)
    torch.testing.assert_close(backend.rms_norm(x, weight, 1e-6), REF.rms_norm(x, weight, 1e-6), **TOLERANCE[DTYPE])
    for got, expected in zip(backend.rms_norm(x, weight, 1e-6, residual), REF.rms_norm(x, weight, 1e-6, residual)):
        torch.testing.assert_close(got, expected, **TOLERANCE[DTYPE])


@interpreted
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_rotary_embedding(backend, heads):
    from test_triton_ops import REF, TOLERANCE

    num_heads, num_kv_heads = heads
    head_dim, tokens = 32, 5
    gen = torch.Generator().manual_seed(1)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(64).float(), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    # query and key as the QKV projection leaves them: strided views of one tensor
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(DTYPE)
    query = qkv[:, : num_heads * head_dim].view(tokens, num_heads, head_dim)
    key = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(tokens, num_kv_heads, head_dim)
    positions = torch.tensor([0, 7, 8, 33, 63])
    for got, expected in zip(
        backend.rotary_embedding(positions, query, key, cos_sin), REF.rotary_embedding(positions, query, key, cos_sin)
    ):
        torch.testing.assert_close(got, expected, **TOLERANCE[DTYPE])


@interpreted
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize(
    "seqs", [[(1, 16), (9, 0), (7, 23), (1, 0), (3, 1)], [(1, 520), (1, 17)]], ids=["mixed", "long-decodes"]
)
def test_paged_attention(backend, group, seqs):
    from test_triton_ops import check_attention

    check_attention(backend, seqs, num_heads=2 * group, num_kv_heads=2, head_dim=32, dtype=DTYPE)


@interpreted
@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_with_sinks_and_a_window(backend, window):
    from test_triton_ops import REF, TOLERANCE, make_step, ref_layout

    q, k, v, k_cache, v_cache, metadata = make_step(
        [(1, 16), (9, 0), (7, 23), (1, 45)], num_heads=8, num_kv_heads=2, head_dim=32, block_size=16, dtype=DTYPE,
        seed=3,
    )
    sinks = torch.randn(8, generator=torch.Generator().manual_seed(3)) * 2
    ref_k, ref_v = ref_layout(k_cache), ref_layout(v_cache)
    REF.store_kv(k, v, ref_k, ref_v, metadata.slot_mapping)
    expected = REF.paged_attention(
        q, k, v, ref_k, ref_v, REF.plan_attention(metadata), 32**-0.5, sinks=sinks, sliding_window=window
    )
    backend.store_kv(k, v, k_cache, v_cache, metadata.slot_mapping)
    out = backend.paged_attention(
        q, k, v, k_cache, v_cache, backend.plan_attention(metadata), 32**-0.5, sinks=sinks, sliding_window=window
    )
    torch.testing.assert_close(out, expected, **TOLERANCE[DTYPE])


@interpreted
def test_blocks_narrower_than_a_gpu_dot_fall_back_to_ours_and_say_so(backend):
    from test_triton_ops import check_attention

    seqs = [(1, 16), (9, 0), (7, 23)]
    check_attention(backend, seqs, num_heads=4, num_kv_heads=2, head_dim=32, dtype=DTYPE, block_size=4)
    assert "paged_attention (block_size not a multiple of 16)" in backend.fallbacks


@interpreted
def test_a_tiny_qwen3_on_the_aiter_backend_gives_the_reference_logits(tiny_qwen3_dir, monkeypatch):
    """Prefill and decode steps of two sequences through the runner, in float32, against the torch backend.

    The runner refuses ``aiter`` on the CPU (it is a GPU backend), so the test hands the runner an
    `AiterBackend` on CPU tensors, which the interpreter runs; everything else is the real runner.
    """
    import attrs

    from atom_trio.config import EngineConfig
    from atom_trio.core.plan import SeqChunk, StepPlan
    from atom_trio.ops.aiter import AiterBackend
    from atom_trio.runner import ModelRunner, model_runner
    from atom_trio.sampling_params import SamplingParams

    get_backend = model_runner.get_backend

    def on_cpu_tensors(name, device):
        return AiterBackend("cpu") if name == "aiter" else get_backend(name, device)

    monkeypatch.setattr(model_runner, "get_backend", on_cpu_tensors)
    config = EngineConfig(
        model=str(tiny_qwen3_dir), device="cpu", dtype="float32", block_size=16, num_kv_blocks=8, max_num_seqs=2, seed=0
    )
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    logits = {}
    for name in ("torch", "aiter"):
        runner = ModelRunner(attrs.evolve(config, kernel_backend=name))
        assert runner.backend.name == name
        chunks = [
            SeqChunk(
                seq_id=i,
                token_ids=list(range(5 + 7 * i, 5 + 7 * i + n)),
                start_pos=0,
                block_table=[2 * i, 2 * i + 1],
                prompt_len=n,
                sample=True,
                sampling_params=greedy,
            )
            for i, n in enumerate((9, 17))
        ]
        steps = []
        for step in range(3):
            steps.append(runner.compute_logits(StepPlan(step_id=step, chunks=chunks)))
            chunks = [c.next_decode(int(t)) for c, t in zip(chunks, steps[-1].argmax(-1))]
        runner.close()
        logits[name] = torch.stack(steps)
    torch.testing.assert_close(logits["aiter"], logits["torch"], atol=1e-5, rtol=1e-5)
