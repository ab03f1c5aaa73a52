"""The option table: every config field is a flag and an env var, and --help and docs/configuration.md show it."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atom_trio.config import EngineConfig, ServerSettings
from atom_trio.errors import InvalidConfig
from atom_trio.options import OPTIONS, add_arguments, load, markdown, options_of, parse_args, unread_env

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "configuration.md"


def test_every_config_field_is_a_flag_and_an_env_var() -> None:
    names = {o.name for o in OPTIONS}
    assert {f.name for f in attrs.fields(EngineConfig)} | {f.name for f in attrs.fields(ServerSettings)} == names
    config, settings = parse_args(
        ["--kv_cache_dtype", "bfloat16", "-tp", "2", "--level", "1", "--max-num-seqs", "8",
         "--max_model_len", "512", "--gpu-memory-utilization", "0.5", "--block-size", "32",
         "--no-enable-prefix-caching", "--api-key", "k", "--port", "9"],
        {"ATOM_TRIO_MAX_NUM_SEQS": "99", "ATOM_TRIO_SHUTDOWN_TIMEOUT": "5", "ATOM_TRIO_MODEL": "/m",
         "ATOM_TRIO_ENFORCE_EAGER": "false"},
    )
    assert (config.kv_cache_dtype, config.tensor_parallel_size, config.level) == ("bfloat16", 2, 1)
    assert not config.enforce_eager and not config.enable_prefix_caching
    assert (config.max_num_seqs, config.max_model_len, config.block_size) == (8, 512, 32)  # flag beats env var
    assert config.gpu_memory_utilization == 0.5 and config.model == "/m"
    assert (settings.api_key, settings.port, settings.shutdown_timeout) == ("k", 9, 5.0)


def test_bad_env_values_name_the_variable() -> None:
    with pytest.raises(InvalidConfig, match="ATOM_TRIO_ENFORCE_EAGER: expected a boolean"):
        load(environ={"ATOM_TRIO_ENFORCE_EAGER": "maybe"})
    with pytest.raises(InvalidConfig, match="ATOM_TRIO_MAX_NUM_SEQS: expected an integer, got 'many'"):
        load(environ={"ATOM_TRIO_MAX_NUM_SEQS": "many"})
    with pytest.raises(InvalidConfig, match=r"dtype must be one of .* got 'float7' \(set by ATOM_TRIO_DTYPE\)"):
        load(environ={"ATOM_TRIO_DTYPE": "float7"})
    # A conflict names every variable it came from; a flag that overrides one takes its name out.
    env = {"ATOM_TRIO_ENFORCE_EAGER": "1", "ATOM_TRIO_LEVEL": "3"}
    with pytest.raises(InvalidConfig, match=r"\(set by ATOM_TRIO_ENFORCE_EAGER, ATOM_TRIO_LEVEL\)$"):
        load(environ=env)
    with pytest.raises(InvalidConfig, match=r"\(set by ATOM_TRIO_ENFORCE_EAGER\)$") as info:
        load({"level": 2}, environ=env)
    assert info.value.options == ("enforce_eager", "level")
    config, _ = load(environ={"ATOM_TRIO_MAX_MODEL_LEN": "none", "ATOM_TRIO_ENFORCE_EAGER": "true"})
    assert config.max_model_len is None and config.enforce_eager
    config, _ = load(environ={"ATOM_TRIO_MAX_MODEL_LEN": ""})  # an empty number is unset, as before
    assert config.max_model_len is None


def test_an_empty_string_is_refused_not_taken_for_unset() -> None:
    """``ATOM_TRIO_API_KEY=$KEY`` with KEY unset must not serve without a key: only ``none`` clears a string."""
    with pytest.raises(InvalidConfig, match=r"api_key must be a non-empty string; got '' \(set by ATOM_TRIO_API_KEY\)"):
        load(environ={"ATOM_TRIO_API_KEY": ""})
    assert load(environ={"ATOM_TRIO_API_KEY": "none"})[1].api_key is None


def test_the_table_documents_every_option_as_its_field_defines_it() -> None:
    config, settings = EngineConfig(), ServerSettings()
    for opt in OPTIONS:
        assert opt.help and opt.section, opt.name
        assert opt.default == getattr(config if opt.owner is EngineConfig else settings, opt.name)
        for choice in opt.choices:  # every listed choice is one the field accepts
            load({opt.name: choice})
        assert set(opt.commands) <= {"serve", "generate", "app"} and "serve" in opt.commands, opt.name
        assert ("app" in opt.commands) == (opt.hypercorn is None), opt.name
    dtype = next(o for o in OPTIONS if o.name == "dtype")
    assert dtype.choices == ("auto", "float32", "bfloat16", "float16") and dtype.section == "Model"
    assert next(o for o in OPTIONS if o.name == "kv_cache_dtype").choices == (*dtype.choices, "fp8", "fp8_e4m3")
    assert next(o for o in OPTIONS if o.name == "profile_dir").flags == [
        "--profile-dir", "--profile_dir", "--torch-profiler-dir", "--torch_profiler_dir"]


def test_each_command_reads_its_own_options() -> None:
    assert options_of("serve") == list(OPTIONS)
    generate = {o.name for o in options_of("generate")}
    assert generate == {f.name for f in attrs.fields(EngineConfig)} | {"log_level"}
    app = {o.name for o in options_of("app")}
    assert {"host", "port", "keep_alive_timeout", "log_level"}.isdisjoint(app)
    assert {"api_key", "max_request_bytes", "shutdown_timeout", "profile_dir", "model"} <= app
    # generate ignores a server variable (it has no server) rather than failing on it
    _, settings = load(environ={"ATOM_TRIO_PORT": "not a port", "ATOM_TRIO_LOG_LEVEL": "debug"}, command="generate")
    assert settings.port == 8000 and settings.log_level == "debug"


def test_unread_env_lists_what_the_app_cannot_honour() -> None:
    env = {"ATOM_TRIO_PORT": "9", "ATOM_TRIO_HOST": "::", "ATOM_TRIO_MODEL": "/m", "ATOM_TRIO_API_KEY": "k"}
    assert [o.env_var for o in unread_env(env, "app")] == ["ATOM_TRIO_HOST", "ATOM_TRIO_PORT"]
    assert unread_env(env, "serve") == []
    _, settings = load(environ=env, command="app")
    assert settings.port == 8000 and settings.api_key == "k"


def test_the_app_logs_each_variable_it_cannot_honour() -> None:
    """What ``hypercorn atom_trio.app:app`` says at import (a real import, in a fresh interpreter)."""
    env = {"ATOM_TRIO_PORT": "9000", "ATOM_TRIO_KEEP_ALIVE_TIMEOUT": "5", "ATOM_TRIO_DEVICE": "cpu",
           "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", "import atom_trio.app"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "is ignored by `hypercorn atom_trio.app:app`" in line]
    assert len(lines) == 2, result.stderr
    assert "ATOM_TRIO_PORT=9000" in lines[0] and "--bind HOST:PORT" in lines[0]
    assert "ATOM_TRIO_KEEP_ALIVE_TIMEOUT=5" in lines[1] and "--keep-alive" in lines[1]


def test_help_shows_every_option_with_its_default_env_var_and_section() -> None:
    parser = argparse.ArgumentParser(prog="atom-trio serve")
    add_arguments(parser)
    shown = " ".join(parser.format_help().split())
    unwrapped = "".join(shown.split())  # argparse wraps lines at spaces and after hyphens
    for opt in OPTIONS:
        shown_default = str(opt.default).lower() if isinstance(opt.default, bool) else opt.default
        default = "" if opt.default is None else f"default: {shown_default}; "
        line = f"{opt.full_help} [{default}env {opt.env_var}]".replace("`", "")
        assert "".join(line.split()) in unwrapped, opt.name
        assert len(opt.help.split()) >= 4, f"{opt.name}: the help only names the option"
        assert all(flag in shown for flag in opt.flags), opt.name
        assert f"{opt.section}:" in shown
    assert [section for section in dict.fromkeys(o.section for o in OPTIONS)] == [
        "Model", "KV cache", "Scheduling", "Parallelism", "Compilation", "Speculative decoding", "Server", "Logging",
        "Tools and reasoning"]
    assert "--dtype {auto,float32,bfloat16,float16}" in shown and "[default: auto; env ATOM_TRIO_DTYPE]" in shown
    assert "--executor {auto,thread,process}" in shown and "--kernel-backend {auto,torch,cpu,triton,aiter}" in shown
    assert "[default: 16; env ATOM_TRIO_BLOCK_SIZE]" in shown
    assert "hypercorn's --bind HOST:PORT does its job" in shown
    assert "`" not in shown and "``" not in shown  # the docs' code marks stay in the docs


def test_generate_help_shows_no_server_option() -> None:
    parser = argparse.ArgumentParser(prog="atom-trio generate")
    add_arguments(parser, "generate")
    shown = parser.format_help()
    assert "--max-num-seqs" in shown and "--log-level" in shown
    assert "--port" not in shown and "--api-key" not in shown and "Server:" not in shown and "Logging:" in shown


def test_configuration_doc_is_generated_from_the_table() -> None:
    expected = markdown()
    assert DOC.read_text() == expected, (
        "docs/configuration.md is out of date: regenerate it with `python -m atom_trio.options > docs/configuration.md`"
    )
    assert all(f"`{opt.env_var}`" in expected for opt in OPTIONS)


# -- a flag and its env var are the same option ------------------------------------------------------


def _text(opt, draw) -> str:  # noqa: ANN001
    """A value's text as a user might type it: often valid, sometimes not."""
    if opt.kind is bool:
        return draw(st.sampled_from(["true", "false", "1", "0", "yes", "off", "maybe"]))
    if opt.choices:
        return draw(st.sampled_from([*opt.choices, "fp8", "x"]))
    if opt.kind is int:
        return str(draw(st.integers(-3, 5000)))
    if opt.kind is float:
        return str(draw(st.floats(-1, 200, allow_nan=False)))
    return draw(st.sampled_from(["cpu", "cuda", "cuda:1", "auto", "mps", "none", "/m", "k"]))


@st.composite
def _option_texts(draw) -> dict[str, str]:  # noqa: ANN001
    chosen = draw(st.lists(st.sampled_from([o for o in OPTIONS if o.kind is not bool]), max_size=6, unique=True))
    return {opt.name: _text(opt, draw) for opt in chosen}


@settings(max_examples=300, deadline=None)
@given(texts=_option_texts())
def test_a_flag_and_its_env_var_give_the_same_config_or_the_same_refusal(texts: dict[str, str]) -> None:
    """Whatever the values, both spellings give the same config or the same one-line `InvalidConfig`."""
    by_name = {o.name: o for o in OPTIONS}
    argv = [f"{by_name[name].flags[0]}={text}" for name, text in texts.items()]
    env = {by_name[name].env_var: text for name, text in texts.items()}

    def outcome(run):  # noqa: ANN001, ANN202
        try:
            return run()
        except InvalidConfig as exc:
            assert "\n" not in str(exc)
            return exc.options, str(exc).split(" (set by ")[0]  # without where the value came from

    assert outcome(lambda: parse_args(argv)) == outcome(lambda: load(environ=env))


def test_no_argparse_noise_for_a_wrong_flag_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--max-num-seqs", "lots"])
    assert "argument --max-num-seqs/--max_num_seqs: expected an integer, got 'lots'" in capsys.readouterr().err

