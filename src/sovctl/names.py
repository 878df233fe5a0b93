"""Model names and digests as the operator, the configuration, the lock and the store spell
them: a name validated so that it cannot escape the store, a sha256 in its one spelling.

A leaf: `sovctl.config` checks [pull.NAME] with these rules, the store and its lock too."""

from __future__ import annotations

import re

from sovctl.errors import UsageError

# fullmatch, never match with "$": "$" also matches before a final newline ("smol\n").
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def is_sha256_hex(value: str) -> bool:
    """A sha256 the way the lock and the blob names spell it: 64 lowercase hex digits."""
    return _SHA256_HEX.fullmatch(value) is not None


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or ".." in name:
        raise UsageError(
            f"invalid model name {name!r}",
            hint="use letters, digits, '.', '_' and '-' (at most 128, starting with a letter "
            "or digit, no '..'), e.g. --name smollm2-135m",
        )
    return name


def name_from_filename(filename: str) -> str:
    stem = filename.rsplit("/", 1)[-1]
    if stem.lower().endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"
    return check_name(cleaned[:128])
