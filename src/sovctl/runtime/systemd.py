"""A systemd unit that keeps the stack up, confined to loopback while no remote route exists."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sovctl.home import Home
from sovctl.net import is_loopback


@dataclass(frozen=True)
class UnitFile:
    path: Path
    text: str
    commands: tuple[str, ...]
    loopback_only: bool


def unit(home: Home, host: str, port: int, chat: Sequence[str], embedding: Sequence[str],
         user: bool, unit_dir: Path | None = None, *, rerank: Sequence[str] = ()) -> UnitFile:
    args = [sys.executable, "-m", "sovctl", "--home", str(home.root), "serve",
            "--host", host, "--port", str(port)]
    for n in chat:
        args += ["--chat", n]
    for n in embedding:
        args += ["--embedding", n]
    for n in rerank:
        args += ["--rerank", n]
    loopback = is_loopback(host)
    network = ["IPAddressDeny=any", "IPAddressAllow=localhost"]
    if not loopback:
        network.append("# The gateway listens beyond loopback: add your clients' networks, "
                       "e.g. IPAddressAllow=192.168.1.0/24")
    text = "\n".join([
        "[Unit]",
        "Description=sovctl sovereign AI stack (local runtimes + gateway)",
        "After=network.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={shlex.join(args)}",
        "Restart=on-failure",
        "RestartSec=5",
        "KillMode=control-group",
        "TimeoutStopSec=30",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ReadWritePaths={home.root}",
        "PrivateTmp=yes",
        *network,
        "Environment=HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1",
        "",
        "[Install]",
        f"WantedBy={'default.target' if user else 'multi-user.target'}",
        "",
    ])
    if unit_dir is None:
        unit_dir = (Path.home() / ".config/systemd/user") if user else Path("/etc/systemd/system")
    ctl = "systemctl --user" if user else "systemctl"
    return UnitFile(unit_dir / "sovctl.service", text,
                    (f"{ctl} daemon-reload", f"{ctl} enable --now sovctl.service",
                     f"{ctl} status sovctl.service"), loopback)
