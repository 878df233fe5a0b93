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


def _require_models() -> None:
    missing = [p for p in (CHAT_MODEL, EMBED_MODEL, TINY_MODEL) if not p.is_file()]
    if missing:
        # In CI the models must be there: a missing model is a failure, never a skip.
        raise pytest.UsageError(
            f"test models missing: {', '.join(map(str, missing))}; set SOVCTL_TEST_MODELS"
        )


_require_models()


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
def tiny_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "stories260K.gguf"
    shutil.copyfile(TINY_MODEL, dest)
    return dest
