"""`sovctl init`: write sovctl.toml from the profile that fits this machine best.

The file it writes is short on purpose: `profile = "NAME"` and comments saying what was chosen
and why. Every value stays in the profile, one layer below the file, so an operator's own
settings added here override it and nothing is copied that could go stale.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sovctl.errors import UsageError
from sovctl.fsutil import atomic_write
from sovctl.home import Home
from sovctl.provision.facts import HostFacts, detect
from sovctl.provision.profiles import ProfileModel, choose, get
from sovctl.result import utcnow


@dataclass(frozen=True)
class InitResult:
    path: str
    profile: str
    auto: bool  # chosen from this machine's facts, not named by the operator
    fits: bool
    reasons: tuple[str, ...]
    summary: str
    models: tuple[ProfileModel, ...]
    backup: str | None  # where the file it replaced went (--force)


def render(profile: str, auto: bool, summary: str, reasons: tuple[str, ...]) -> str:
    how = "chosen for this machine" if auto else "named with --profile"
    lines = [
        f"# sovctl.toml, written by `sovctl init` at {utcnow()}.",
        f"# Profile {profile} ({how}): {summary or 'no summary'}.",
        *(f"#   - {r}" for r in reasons),
        "# The profile holds the models to pull ([pull.*]) and serve ([models.*]), the serving",
        "# settings and the cost figures; `sovctl profiles` shows it. A section added here",
        "# ([serve], [cost], [models.NAME], [pull.NAME], ...) overrides the profile's values.",
        f'profile = "{profile}"',
        "",
    ]
    return "\n".join(lines)


def init(
    home: Home,
    profile: str = "auto",
    *,
    force: bool = False,
    facts: HostFacts | None = None,
    environ: Mapping[str, str] | None = None,
) -> InitResult:
    path = home.config_path
    if path.exists() and not force:
        raise UsageError(f"{path} already exists; nothing was changed",
                         hint="edit it, or pass --force to replace it; the old file is then "
                         "kept as sovctl.toml.bak")
    facts = facts or detect(home)
    auto = profile == "auto"
    chosen = choose(home, facts, environ) if auto else get(home, profile, facts, environ)
    p = chosen.profile  # read and checked in full: a malformed profile stopped us already
    text = render(p.name, auto, p.summary, chosen.reasons)
    backup = None
    if path.exists():
        bak = path.with_name(path.name + ".bak")
        atomic_write(bak, path.read_bytes())
        backup = str(bak)
    home.ensure()
    atomic_write(path, text.encode())
    return InitResult(str(path), p.name, auto, chosen.fits, chosen.reasons, p.summary,
                      p.models, backup)
