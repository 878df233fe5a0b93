"""A cluster: RPC workers (`sovctl worker`, llama.cpp's ggml-rpc-server) lending their memory and
compute to a head's chat runtime (`llama-server --rpc HOST:PORT,...`).

llama.cpp's RPC protocol has neither authentication nor encryption: whoever reaches a worker's
port can run graphs on it and read the tensors it holds. A worker therefore binds only to an
address that stays on a private network, unless its operator says otherwise.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sovctl.config import Settings, parse_endpoint
from sovctl.errors import ConfigError, UsageError
from sovctl.home import Home
from sovctl.llamacpp import SETUP_HINT, find_binary
from sovctl.net import Resolver, _system_resolver, ip_literal
from sovctl.runtime import egress
from sovctl.runtime.documents import ProcessKind
from sovctl.runtime.plan import OFFLINE_ENV, Plan
from sovctl.runtime.procs import Argv, ProcessSpec

RPC_WORKER = "ggml-rpc-server"
WORKER = "worker"  # the worker's process name in its plan (its kind: ProcessKind.WORKER)
ACK_FLAG = "--i-know-rpc-is-unauthenticated"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def wireguard_addresses() -> set[str]:
    """Addresses of this machine's WireGuard interfaces (named wg*, as wg-quick names them)."""
    import psutil

    return {a.address.split("%", 1)[0] for name, addrs in psutil.net_if_addrs().items()
            if name.startswith("wg") for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)}


def _scope(addr: IPAddress, wireguard: set[str]) -> str | None:
    if addr.is_loopback:
        return "loopback"
    if str(addr) in wireguard:
        return "wireguard"
    if addr.is_private and not addr.is_unspecified:
        return "private"
    return None


def _addresses(host: str, resolve: Resolver) -> list[IPAddress]:
    """What `host` means: itself when an address, else what it resolves to (none if it does
    not)."""
    literal = ip_literal(host)
    if literal is not None:
        return [literal]
    try:
        return [a for a in map(ip_literal, resolve(host)) if a is not None]
    except (OSError, UnicodeError):
        return []


def bind_scope(host: str, allow_unauthenticated: bool = False,
               wireguard: Callable[[], set[str]] = wireguard_addresses,
               resolve: Resolver = _system_resolver) -> str:
    """Where a worker bound to `host` can be reached from: "loopback", "private" (RFC 1918,
    unique local), "wireguard" (an address of a wg* interface) or, only when the operator
    acknowledged it, "public". Anything else is refused."""
    addresses = _addresses(host, resolve)
    wg = wireguard()
    scopes = {_scope(a, wg) for a in addresses}
    if addresses and None not in scopes:
        # A name meaning several kinds of private address is as private as its widest one.
        return next(s for s in ("private", "wireguard", "loopback") if s in scopes)
    if allow_unauthenticated:
        return "public"
    what = ("every interface, public ones included" if any(a.is_unspecified for a in addresses)
            else "an address that does not resolve" if not addresses
            else "a public address")
    raise UsageError(
        f"refusing to run an RPC worker on {host}: that is {what}, and llama.cpp's RPC is "
        "unauthenticated (whoever reaches the port can use the worker and read its tensors)",
        hint="bind to a loopback, private (10/8, 172.16/12, 192.168/16, fc00::/7) or WireGuard "
        f"address with --host, or pass {ACK_FLAG} if a firewall already guards it")


def device_arg(device: str) -> str:
    """`cpu` or `cuda:N`, as ggml names its devices (CPU, CUDA0, ...)."""
    if device == "cpu":
        return "CPU"
    kind, _, index = device.partition(":")
    if kind == "cuda" and index.isdigit():
        return f"CUDA{int(index)}"
    raise UsageError(f"unknown device {device!r}", hint="use cpu or cuda:N (cuda:0, cuda:1, ...)")


def worker_argv(binary: str, host: str, port: int, device: str, threads: int, cache: str | None,
                env: Mapping[str, str]) -> Argv:
    """The worker through sovctl.runtime.launch, as every supervised process starts."""
    args = [sys.executable, "-m", "sovctl.runtime.launch", WORKER, "--exec", binary,
            "--host", host, "--port", str(port), "--device", device_arg(device),
            "--threads", str(threads)]
    env = dict(env)
    if cache is not None:
        # ggml-rpc-server keeps tensors it was sent by hash under LLAMA_CACHE: a head that
        # restarts then sends hashes, not the weights again.
        args.append("--cache")
        env["LLAMA_CACHE"] = cache
    return Argv(args=tuple(args), env=env)


def worker_plan(home: Home, cfg: Settings, host: str, port: int, device: str, threads: int,
                cache: bool = False, allow_unauthenticated: bool = False) -> tuple[Plan, str]:
    """(the plan of a worker: one supervised ggml-rpc-server and no gateway, its bind scope).
    No side effects, as plan.build."""
    scope = bind_scope(host, allow_unauthenticated)
    binary = find_binary(RPC_WORKER)
    if binary is None:
        raise ConfigError(f"no {RPC_WORKER} binary was found", hint=SETUP_HINT)
    run = home.run
    argv = worker_argv(str(binary), host, port, device, threads,
                       str(home.root / "cache" / "rpc") if cache else None,
                       {**OFFLINE_ENV, egress.ENV_LOG: str(run / "egress.jsonl")})
    notes = () if scope != "public" else (
        f"the worker on {host} is reachable beyond a private network and unauthenticated",)
    return Plan(
        host=host, port=port,
        processes=(ProcessSpec(name=WORKER, kind=ProcessKind.WORKER, argv=argv, port=port,
                               health_path=""),),
        models=(), routes_file=str(run / "routes.json"), state_file=str(run / "state.json"),
        egress_log=str(run / "egress.jsonl"), logs_dir=str(home.logs), api_key_required=False,
        supervision=cfg.serve,
        notes=notes,
    ), scope


# -- the head's side ------------------------------------------------------------------------------

_HELLO, _GET_DEVICE_MEMORY, _DEVICE_COUNT = 14, 11, 15
_CAPS = 24  # bytes of transport capabilities in HELLO (zero: plain TCP)


@dataclass(frozen=True)
class WorkerHealth:
    endpoint: str
    ok: bool
    free: int = 0  # bytes free over the worker's devices
    total: int = 0
    reason: str = ""  # why it cannot be used, when not ok
    devices: tuple[tuple[int, int], ...] = ()  # (free, total) of each device, in its order

    def describe(self) -> str:
        if not self.ok:
            return f"{self.endpoint} ({self.reason})"
        return f"{self.endpoint} ({self.free >> 20} MiB free of {self.total >> 20} MiB)"


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the worker closed the connection")
        data += chunk
    return data


def _call(sock: socket.socket, cmd: int, payload: bytes, answer: int) -> bytes:
    # RPC request: cmd (1 byte) | size (u64) | payload; answer: size (u64) | data.
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    (size,) = struct.unpack("<Q", _recv(sock, 8))
    if size != answer:
        raise ConnectionError(f"unexpected answer of {size} bytes to command {cmd}")
    return _recv(sock, size)


def probe_worker(endpoint: str, timeout: float = 3.0) -> WorkerHealth:
    """Ask a worker for its devices' memory over its own protocol (HELLO, DEVICE_COUNT,
    GET_DEVICE_MEMORY). A worker serves one client at a time: one busy with another head does
    not answer in time, and is as unusable to this one as a dead one."""
    host, port = parse_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            hello = _call(sock, _HELLO, bytes(_CAPS), 4 + _CAPS)
            if hello[0] != 7:
                return WorkerHealth(endpoint, False, reason=f"RPC protocol v{hello[0]}, not v7")
            (count,) = struct.unpack("<I", _call(sock, _DEVICE_COUNT, b"", 4))
            devices = tuple(
                struct.unpack("<QQ", _call(sock, _GET_DEVICE_MEMORY, struct.pack("<I", d), 16))
                for d in range(count))
    except TimeoutError:
        return WorkerHealth(endpoint, False, reason="no answer: down, or busy with another head")
    except OSError as e:
        return WorkerHealth(endpoint, False, reason=e.strerror or str(e))
    return WorkerHealth(endpoint, True, sum(f for f, _ in devices), sum(t for _, t in devices),
                        devices=devices)


def connected_workers(pid: int, endpoints: Sequence[str],
                      resolve: Resolver = _system_resolver) -> set[str] | None:
    """Those of `endpoints` that process `pid` (or a child: under the audit's strace the
    runtime is one) holds an established TCP connection to; None when it is gone. llama.cpp's
    RPC client keeps one connection per worker for the runtime's life, and the kernel closes
    it when the worker dies: no packet is sent to the worker to find out."""
    import psutil

    wanted: dict[tuple[str, int], str] = {}
    for endpoint in endpoints:
        host, port = parse_endpoint(endpoint)
        wanted.update({(str(a), port): endpoint for a in _addresses(host, resolve)})
    try:
        root = psutil.Process(pid)
        conns = [c for proc in (root, *root.children(recursive=True))
                 for c in proc.net_connections(kind="tcp")]
    except psutil.NoSuchProcess:
        return None
    held = set()
    for c in conns:
        if c.raddr and c.status == psutil.CONN_ESTABLISHED:
            address = ipaddress.ip_address(c.raddr.ip)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            if (str(address), c.raddr.port) in wanted:
                held.add(wanted[(str(address), c.raddr.port)])
    return held


def rpc_argv(args: Sequence[str], workers: Sequence[str]) -> tuple[str, ...]:
    """A runtime's argv with its --rpc list narrowed to `workers` (dropped when none is left:
    its layers then stay on the head)."""
    out = list(args)
    i = out.index("--rpc")
    if workers:
        out[i + 1] = ",".join(workers)
    else:
        del out[i:i + 2]
    return tuple(out)


# llama.cpp names an RPC device RPCn[HOST:PORT] in its load log, one line per buffer it puts
# there: "load_tensors: RPC0[10.0.0.2:50052] model buffer size = 49.13 MiB", and likewise
# KV, compute and output buffers.
_HELD = re.compile(r"\bRPC\d+\[([^\]]+)\]\s+\S+ buffer size =\s*([\d.]+) MiB")


def held_on_workers(log: str) -> dict[str, int]:
    """Bytes a runtime put on each worker, summed over the buffers its load log lists."""
    held: dict[str, int] = {}
    for endpoint, mib in _HELD.findall(log):
        held[endpoint] = held.get(endpoint, 0) + int(float(mib) * (1 << 20))
    return held
