"""The AITER call table against the pinned amd-aiter's sources, read with `ast`: no GPU, no ROCm, no AITER import.

Every function the aiter backend calls must exist in the module the table
names, take the table's parameters first, by those names and in that order
(the backend passes them positionally), and have defaults for the rest. The
NVIDIA compatibility module must answer every question AITER's two
device-query modules answer. ``amd-aiter`` comes with the ``test`` extra (a
pure-Python wheel); an environment without it skips, saying so.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
from pathlib import Path

import pytest

from atom_trio.ops.aiter import nvidia
from atom_trio.ops.aiter.calls import ROCM_CALLS, ROTATE_NEOX, TRITON_CALLS, AiterCall, BoundAiterCall
from atom_trio.ops.aiter.loader import PINNED_VERSION

_spec = importlib.util.find_spec("aiter")
pytestmark = pytest.mark.skipif(
    _spec is None, reason="amd-aiter is not installed (pip install -e '.[test]' brings the pinned wheel)"
)
ROOT = Path(next(iter(_spec.submodule_search_locations))) if _spec is not None else Path()
ALL_CALLS = {f"triton:{op}": call for op, call in TRITON_CALLS.items()} | {
    f"rocm:{op}": call for op, call in ROCM_CALLS.items()
}


def source_of(module: str) -> ast.Module:
    """The parsed source of AITER's ``module`` (``aiter.ops.triton.rope`` is ``<root>/ops/triton/rope.py``)."""
    path = ROOT.joinpath(*module.split(".")[1:]).with_suffix(".py")
    assert path.is_file(), f"{module} is not in the installed amd-aiter ({path} is missing)"
    return ast.parse(path.read_text(), filename=str(path))


def top_level_functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_the_installed_aiter_is_the_pinned_one():
    assert importlib.metadata.version("amd-aiter") == PINNED_VERSION


@pytest.mark.parametrize("call", ALL_CALLS.values(), ids=ALL_CALLS.keys())
def test_each_call_matches_the_function_it_names(call: AiterCall):
    function = top_level_functions(source_of(call.module)).get(call.function)
    assert function is not None, f"{call.qualified_name} is not defined"
    arguments = function.args
    positional = [a.arg for a in arguments.posonlyargs + arguments.args]
    passed = len(call.parameters)
    assert tuple(positional[:passed]) == call.parameters, (
        f"{call.qualified_name}({', '.join(positional)}) does not start with the table's ({', '.join(call.parameters)})"
    )
    first_default = len(positional) - len(arguments.defaults)
    assert first_default <= passed, f"{call.qualified_name} requires {positional[passed:first_default]}, not passed"
    required_keywords = [a.arg for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults) if d is None]
    assert not required_keywords, f"{call.qualified_name} requires keywords {required_keywords}"


def test_the_rotate_style_the_backend_passes_is_neox():
    tree = source_of(TRITON_CALLS["rotary_embedding"].module)
    (style,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "RotateStyle"]
    values = {
        target.id: ast.literal_eval(node.value)
        for node in style.body
        if isinstance(node, ast.Assign)
        for target in node.targets
    }
    neox = values["NEOX"]
    assert (neox[0] if isinstance(neox, tuple) else neox) == ROTATE_NEOX  # IntEnum unpacks NEOX = (0,) to 0


@pytest.mark.parametrize("module", ["aiter.ops.triton.utils._triton.arch_info", "aiter.ops.triton.utils.device_info"])
def test_the_nvidia_module_answers_what_each_device_query_module_does(module: str):
    public = {name for name in top_level_functions(source_of(module)) if not name.startswith("_")}
    assert public, module
    missing = sorted(name for name in public if not callable(getattr(nvidia, name, None)))
    assert not missing, f"atom_trio.ops.aiter.nvidia lacks {missing}, which AITER's {module} defines"


def test_a_bound_call_takes_the_tables_names_in_the_tables_order():
    call = TRITON_CALLS["rms_norm"]
    bound = BoundAiterCall(call, lambda *args: args)
    assert bound(input="x", weight="w", epsilon=1e-6) == ("x", "w", 1e-6)
    with pytest.raises(TypeError, match="the call table says"):
        bound(weight="w", input="x", epsilon=1e-6)
    with pytest.raises(TypeError, match="the call table says"):
        bound(input="x", weight="w")
