"""What the package says about itself holds: one version, and the Python versions it claims to run on."""

from __future__ import annotations

import ast
import configparser
import re
import sys
import tomllib
from pathlib import Path

import atom_trio

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def oldest_python() -> tuple[int, int]:
    """The oldest Python ``requires-python`` admits; it must be a plain ``>=3.N``."""
    match = re.fullmatch(r">=3\.(\d+)", PROJECT["requires-python"])
    assert match, f"requires-python should read '>=3.N', not {PROJECT['requires-python']!r}"
    return 3, int(match[1])


def test_the_version_is_pyprojects() -> None:
    assert atom_trio.__version__ == PROJECT["version"]


async def test_the_server_reports_the_version() -> None:
    from atom_trio.server import create_app

    response = await create_app().test_client().get("/version")  # the engine starts only while serving
    assert (await response.get_json()) == {"version": PROJECT["version"]}


def test_sources_parse_as_the_oldest_claimed_python() -> None:
    """Syntax newer than the claim fails here; names newer than it fail when CI runs that oldest version."""
    paths = [p for top in ("atom_trio", "tests", "benchmarks") for p in sorted((REPO / top).rglob("*.py"))]
    assert paths
    for path in paths:
        ast.parse(path.read_text(), filename=str(path), feature_version=oldest_python())


def test_tox_classifiers_and_ci_cover_the_claimed_versions() -> None:
    """A tox env and a classifier per claimed version, from the oldest on; CI and the README run the oldest."""
    tox = configparser.ConfigParser()
    tox.read(REPO / "tox.ini")
    envs = re.split(r"[,\s]+", tox["tox"]["envlist"].strip())
    classified = [c.rsplit(":: ", 1)[1] for c in PROJECT["classifiers"] if re.fullmatch(r".*:: 3\.\d+", c)]
    newest = int(classified[-1].split(".")[1])
    claimed = [(3, minor) for minor in range(oldest_python()[1], newest + 1)]
    assert classified == [f"3.{minor}" for _, minor in claimed]
    assert envs == [f"py3{minor}" for _, minor in claimed]
    oldest_env = envs[0]
    assert f"tox -e {oldest_env}\n" in (REPO / ".ci" / "run").read_text()
    assert f"tox -e {oldest_env}" in (REPO / "README.md").read_text().split("\n\n")[1]
    assert sys.version_info[:2] in claimed
