"""The option table: every config field is a flag and an env var, and --help and docs/configuration.md show it."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from atom_trio.config import EngineConfig, ServerSettings
from atom_trio.options import OPTIONS, add_arguments, load, markdown, parse_args

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_every_config_field_is_a_flag_and_an_env_var() -> None:
    names = {o.name for o in OPTIONS}
    assert {f.name for f in attrs.fields(EngineConfig)} | {f.name for f in attrs.fields(ServerSettings)} == names
    config, settings = parse_args(
        ["--kv_cache_dtype", "fp8", "-tp", "2", "--level", "1", "--enforce-eager", "--max-num-seqs", "8",
         "--max_model_len", "512", "--gpu-memory-utilization", "0.5", "--block-size", "32",
         "--no-enable-prefix-caching", "--api-key", "k", "--port", "9"],
        {"ATOM_TRIO_MAX_NUM_SEQS": "99", "ATOM_TRIO_SHUTDOWN_TIMEOUT": "5", "ATOM_TRIO_MODEL": "/m"},
    )
    assert (config.kv_cache_dtype, config.tensor_parallel_size, config.level) == ("fp8", 2, 1)
    assert config.enforce_eager and not config.enable_prefix_caching
    assert (config.max_num_seqs, config.max_model_len, config.block_size) == (8, 512, 32)  # flag beats env var
    assert config.gpu_memory_utilization == 0.5 and config.model == "/m"
    assert (settings.api_key, settings.port, settings.shutdown_timeout) == ("k", 9, 5.0)


def test_bad_env_values_name_the_variable() -> None:
    with pytest.raises(ValueError, match="ATOM_TRIO_ENFORCE_EAGER"):
        load(environ={"ATOM_TRIO_ENFORCE_EAGER": "maybe"})
    with pytest.raises(ValueError, match="dtype"):
        load(environ={"ATOM_TRIO_DTYPE": "float7"})
    config, _ = load(environ={"ATOM_TRIO_MAX_MODEL_LEN": "none", "ATOM_TRIO_ENFORCE_EAGER": "true"})
    assert config.max_model_len is None and config.enforce_eager


def test_the_table_documents_every_option_as_its_field_defines_it() -> None:
    config, settings = EngineConfig(), ServerSettings()
    for opt in OPTIONS:
        assert opt.help and opt.section, opt.name
        assert opt.default == getattr(config if opt.owner is EngineConfig else settings, opt.name)
        for choice in opt.choices:  # every listed choice is one the field accepts
            load({opt.name: choice})
    dtype = next(o for o in OPTIONS if o.name == "dtype")
    assert dtype.choices == ("auto", "float32", "bfloat16", "float16") and dtype.section == "Model"
    assert next(o for o in OPTIONS if o.name == "profile_dir").flags == [
        "--profile-dir", "--profile_dir", "--torch-profiler-dir", "--torch_profiler_dir"]


def test_help_shows_every_option_with_its_env_var_and_section() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="atom-trio serve")
    add_arguments(parser)
    shown = " ".join(parser.format_help().split())
    for opt in OPTIONS:
        assert " ".join(f"{opt.help} [env {opt.env_var}]".split()) in shown, opt.name
        assert all(flag in shown for flag in opt.flags), opt.name
        assert f"{opt.section}:" in shown
    assert "--dtype {auto,float32,bfloat16,float16}" in shown


def test_configuration_doc_is_generated_from_the_table() -> None:
    expected = markdown()
    assert DOC.read_text() == expected, (
        "docs/configuration.md is out of date: regenerate it with `python -m atom_trio.options > docs/configuration.md`"
    )
    assert all(f"`{opt.env_var}`" in expected for opt in OPTIONS)
