"""Shared fixtures: every test gets its own SOVCTL_HOME; models come from the shared folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("SOVCTL_TEST_MODELS", ROOT.parent / "shared" / "models"))

CHAT_MODEL = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBED_MODEL = MODELS / "all-MiniLM-L6-v2-f16.gguf"
TINY_MODEL = MODELS / "stories260K.gguf"
MMPROJ = MODELS / "mmproj-tiny-random-f16.gguf"


@pytest.fixture(scope="session")
def models() -> Path:
    """The shared test models' folder. A test that needs a model requests this fixture (or
    `pytestmark = pytest.mark.usefixtures("models")`): when a model is missing it fails, never
    skips, so CI cannot go green without running it; tests that need no model still run."""
    missing = [p for p in (CHAT_MODEL, EMBED_MODEL, TINY_MODEL, MMPROJ) if not p.is_file()]
    if missing:
        pytest.fail(f"test models missing: {', '.join(map(str, missing))}; set "
                    "SOVCTL_TEST_MODELS to the folder that holds them (see README)", pytrace=False)
    return MODELS


@pytest.fixture(autouse=True)
def sovctl_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "sovctl-home"
    monkeypatch.setenv("SOVCTL_HOME", str(home))
    for var in list(os.environ):
        if var.startswith("SOVCTL_") and var not in ("SOVCTL_HOME", "SOVCTL_TEST_MODELS"):
            monkeypatch.delenv(var)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return home


@pytest.fixture
def cli():
    """Invoke sovctl in-process through typer's CliRunner, with its real error handling."""
    from sovctl.cli import _common, app

    runner = CliRunner()

    def invoke(*args: str, input: str | None = None):
        _common.STATE.json = False
        return runner.invoke(app, list(args), input=input, catch_exceptions=False)

    return invoke


@pytest.fixture
def tiny_copy(tmp_path: Path, models: Path) -> Path:
    dest = tmp_path / "stories260K.gguf"
    shutil.copyfile(TINY_MODEL, dest)
    return dest
