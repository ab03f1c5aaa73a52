"""Importing AITER's modules: the whole package on ROCm, its Triton kernels alone elsewhere.

``import aiter`` runs ``aiter/__init__.py``, which loads (and on first use
JIT-builds with hipcc) the HIP/CK extensions: it fails without ROCm. AITER's
Triton kernels (``aiter/ops/triton/``) need none of that; they import only
each other, ``aiter.ops.triton.utils`` and Triton. So off ROCm the loader
puts module objects for the three parent packages (``aiter``, ``aiter.ops``,
``aiter.ops.triton``) in ``sys.modules``, with ``__path__`` pointing into the
installed wheel and none of their ``__init__`` run, registers the NVIDIA
compatibility module (`nvidia`) in place of AITER's two device-query modules,
and lets Python import the kernel modules from the wheel's files as they are.
On ROCm it imports AITER normally, compiled ops included.

Once the stand-in parents are registered, ``import aiter`` in this process
returns them: off ROCm nothing else could import AITER anyway.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import torch

from . import nvidia

PINNED_VERSION = "0.1.7.post2.dev18"
"""The ``amd-aiter`` release whose signatures the call table is written against (and the contract test checks)."""

TRITON_PACKAGE = "aiter.ops.triton"
_PARENTS = ("aiter", "aiter.ops", TRITON_PACKAGE)
_DEVICE_QUERIES = ("aiter.ops.triton.utils._triton.arch_info", "aiter.ops.triton.utils.device_info")


def on_rocm() -> bool:
    return torch.version.hip is not None


def aiter_root() -> Path | None:
    """The installed ``aiter`` package's directory, found without importing it; None without ``amd-aiter``."""
    spec = importlib.util.find_spec("aiter") if "aiter" not in sys.modules else sys.modules["aiter"].__spec__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def load(module: str) -> types.ModuleType:
    """AITER's module ``module`` (``aiter.ops.triton.rmsnorm``, or on ROCm also a compiled op's ``aiter.ops.rmsnorm``).

    Off ROCm only modules under ``aiter.ops.triton`` load; their kernels drop
    AMD-only launch options (`nvidia.drop_amd_launch_options`).
    """
    if on_rocm():
        importlib.import_module("aiter")  # the real package: loads the compiled extensions
        return importlib.import_module(module)
    if not module.startswith(TRITON_PACKAGE + "."):
        raise ImportError(f"{module} is one of AITER's compiled ops, which need ROCm; here only Triton kernels load")
    _register_stand_ins()
    loaded = importlib.import_module(module)
    nvidia.drop_amd_launch_options(TRITON_PACKAGE + ".")
    return loaded


def _register_stand_ins() -> None:
    if sys.modules.get(TRITON_PACKAGE) is not None:
        return
    root = aiter_root()
    if root is None:
        raise ImportError("the aiter kernel backend needs amd-aiter (pip install 'atom-trio[rocm]')")
    for name in _PARENTS:
        if name not in sys.modules:
            _add_package(name, root.joinpath(*name.split(".")[1:]))
    for name in _DEVICE_QUERIES:
        parent = importlib.import_module(name.rpartition(".")[0])
        sys.modules[name] = nvidia
        setattr(parent, name.rpartition(".")[2], nvidia)


def _add_package(name: str, directory: Path) -> None:
    """A package module whose submodules import from ``directory``; its ``__init__.py`` is not run."""
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(directory)]
    package = importlib.util.module_from_spec(spec)
    package.__doc__ = f"AITER's {name} without its __init__ (atom_trio.ops.aiter.loader)"
    sys.modules[name] = package
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, package)
