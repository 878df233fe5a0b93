"""Where the pinned llama.cpp build lives: the llama-server binary and the facts of its build.

scripts/setup compiles llama.cpp once and installs it inside the llama_cpp package
(llama_cpp/lib for the libraries, llama_cpp/bin for llama-server and ggml-rpc-server), so the
in-process engine and the serving runtime are the same commit and the same compile. The
package is located without importing it: importing llama_cpp loads the shared libraries.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from sovctl.errors import ConfigError

# Where the build's ggml-rpc-server listens unless told otherwise: `sovctl worker`'s default.
RPC_PORT = 50052
SETUP_HINT = "run ./scripts/setup from the sovctl checkout (it builds llama-server once), or " \
             "set [serve] llama_server = \"/path/to/llama-server\" in sovctl.toml"


def _package_dir() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_binary(name: str, setting: str = "") -> Path | None:
    """`setting` when given (a path), else the build inside llama_cpp, the venv, then PATH."""
    if setting:
        p = Path(setting).expanduser()
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise ConfigError(f"{name} setting points at {p}, which is not an executable file",
                              hint=SETUP_HINT)
        return p
    pkg = _package_dir()
    candidates = [pkg / "bin" / name] if pkg else []
    candidates.append(Path(sys.prefix) / "bin" / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    found = shutil.which(name)
    return Path(found) if found else None


@dataclass(frozen=True)
class BuildInfo:
    """What scripts/build-llama-cpp recorded about the one llama.cpp build."""

    llama_cpp_python: str
    build_number: str
    commit: str
    flags: str


def build_info() -> BuildInfo | None:
    pkg = _package_dir()
    if pkg is None:
        return None
    try:
        d = tomllib.loads((pkg / "lib" / "sovctl-build.toml").read_text())
    except (FileNotFoundError, tomllib.TOMLDecodeError):
        return None
    return BuildInfo(str(d.get("llama_cpp_python", "")), str(d.get("build_number", "")),
                     str(d.get("commit", "")), str(d.get("flags", "")))
