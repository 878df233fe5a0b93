"""`sovctl tunnel`: the stack's public face over SSH to a host the operator owns.

The end-to-end tests start a real OpenSSH server (Debian's openssh-server) on a free loopback
port as the "public host", logging the tunnel in with a key restricted as the docs' recipe
restricts it (port forwarding to its one port, nothing else), so no traffic leaves the machine.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from tests.conftest import TINY_MODEL
from tests.helpers import processes, run, run_json, wait_for

from sovctl import config
from sovctl.errors import ConfigError, UsageError
from sovctl.home import Home
from sovctl.runtime import tunnel
from sovctl.runtime.ports import free_port

SSHD = Path("/usr/sbin/sshd")
FAST = {
    "SOVCTL_SERVE__HEALTH_INTERVAL": "0.5",
    "SOVCTL_SERVE__HEALTH_TIMEOUT": "2",
    "SOVCTL_SERVE__HEALTH_FAILURES": "2",
    "SOVCTL_SERVE__STOP_TIMEOUT": "5",
}


def _tunnel(home: Path, **settings: object) -> tunnel.Tunnel:
    flags = {f"tunnel.{k}": v for k, v in settings.items()}
    t = tunnel.from_settings(Home(home), config.load(Home(home), flags=flags))
    assert t is not None
    return t


# -- units -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("via", "parsed"), [
    ("tunnel@vps.example.org", ("tunnel", "vps.example.org", 22)),
    ("root@127.0.0.1:2222", ("root", "127.0.0.1", 2222)),
    ("u@[2001:db8::1]:2200", ("u", "2001:db8::1", 2200)),
    ("vps.example.org", ("", "vps.example.org", 22)),
    ("u@-oProxyCommand=x", None),  # never an option to ssh
    ("-x@host", None),
    ("u@host:0", None),
    ("u@host:99999", None),
    ("u@ho st", None),
    ("u@2001:db8::1", None),  # an IPv6 address goes in brackets
])
def test_parse_via(via: str, parsed: tuple[str, str, int] | None) -> None:
    assert tunnel.parse_via(via) == parsed


def test_ssh_argv(sovctl_home: Path, tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    key.write_text("not read here\n")
    t = _tunnel(sovctl_home, via="tunnel@vps.example.org:2222", remote_port=8443,
                identity=str(key))
    argv = tunnel.ssh_argv(t, "/usr/bin/ssh", ("127.0.0.1", 8088), 40001, {"DO_NOT_TRACK": "1"})
    args = list(argv.args)
    assert args[1:6] == ["-m", "sovctl.runtime.launch", "tunnel", "--exec", "/usr/bin/ssh"]
    ssh = args[5:]
    options = [ssh[i + 1] for i, a in enumerate(ssh) if a == "-o"]
    known_hosts = sovctl_home / "tunnel" / "known_hosts"
    for o in ("ExitOnForwardFailure=yes", "ServerAliveInterval=15", "ServerAliveCountMax=3",
              "StrictHostKeyChecking=yes", f'UserKnownHostsFile="{known_hosts}"',
              "GlobalKnownHostsFile=/dev/null", "BatchMode=yes", "IdentitiesOnly=yes"):
        assert o in options
    # The host's confirmation of the remote forward is logged, by an ssh that knows how.
    assert options.index("IgnoreUnknown=LogVerbose") < options.index(
        "LogVerbose=ssh.c:ssh_confirm_remote_forward():*")
    assert not [o for o in options if o.startswith("StrictHostKeyChecking=") and o.endswith("no")]
    assert ssh[1] == "-N" and ssh[ssh.index("-F") + 1] == "/dev/null"
    assert ssh[ssh.index("-i") + 1] == str(key) and ssh[ssh.index("-p") + 1] == "2222"
    assert ssh[ssh.index("-R") + 1] == "8443:127.0.0.1:8088"
    assert ssh[ssh.index("-L") + 1] == "127.0.0.1:40001:127.0.0.1:8443"
    assert ssh[-2:] == ["--", "tunnel@vps.example.org"]
    assert tunnel.forwards(ssh) == [("-R", "8443:127.0.0.1:8088"),
                                    ("-L", "127.0.0.1:40001:127.0.0.1:8443")]
    assert argv.env == {"DO_NOT_TRACK": "1"}
    # A bind address on the public host; the probe then enters there.
    wide = _tunnel(sovctl_home, via="u@[2001:db8::1]", remote_bind="10.0.0.5")
    args = list(tunnel.ssh_argv(wide, "ssh", ("::1", 9000), 1, {}).args)
    assert args[args.index("-R") + 1] == "10.0.0.5:8088:[::1]:9000"
    assert args[args.index("-L") + 1] == "127.0.0.1:1:10.0.0.5:8088"
    assert "-i" not in args and args[-1] == "u@2001:db8::1"
    assert (t.host_key_name, wide.host_key_name) == ("[vps.example.org]:2222", "2001:db8::1")
    assert tunnel.gateway_target("0.0.0.0", 8088) == "127.0.0.1:8088"
    assert tunnel.gateway_target("::", 8088) == "[::1]:8088"


def test_settings_errors(sovctl_home: Path, tmp_path: Path) -> None:
    home = Home(sovctl_home)
    assert tunnel.from_settings(home, config.load(home)) is None
    with pytest.raises(UsageError, match="not USER@HOST"):
        _tunnel(sovctl_home, via="u@-oProxyCommand=x")
    with pytest.raises(UsageError, match="is not a file"):
        _tunnel(sovctl_home, via="u@h", identity=str(tmp_path / "none"))
    home.ensure()
    home.config_path.write_text('[tunnel]\nvia = "u@h"\nremote_bind = "a b"\n')
    with pytest.raises(ConfigError, match="remote_bind"):
        tunnel.from_settings(home, config.load(home))
    home.config_path.write_text('[tunnel]\nvia = "bad host"\n')
    with pytest.raises(ConfigError, match="not USER@HOST"):
        tunnel.from_settings(home, config.load(home))


CHANGED = """@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
The fingerprint for the ED25519 key sent by the remote host is
SHA256:B/7Ba9O+0bXLJj+Xjz1Na/32MGdkwleqJ7uMTPDNlgU.
Host key for [127.0.0.1]:12222 has changed and you have requested strict checking.
Host key verification failed.
"""


@pytest.mark.parametrize(("output", "fatal", "words"), [
    (CHANGED, True, "changed: it is not the key pinned in"),
    ("No ED25519 host key is known for [h]:2222 and you have requested strict checking.\n"
     "Host key verification failed.\n", True, "no host key of [h]:2222 is pinned"),
    ("u@h: Permission denied (publickey).\n", True, "refused the login"),
    ("Error: remote port forwarding failed for listen port 8088\n", False, "listen on port 8088"),
    ("ssh: connect to host h port 2222: Connection refused\n", False,
     "ssh: connect to host h port 2222: Connection refused"),
])
def test_diagnose(sovctl_home: Path, output: str, fatal: bool, words: str) -> None:
    t = _tunnel(sovctl_home, via="u@h:2222")
    failure = tunnel.diagnose(t, output)
    assert failure is not None and failure.fatal == fatal
    assert words in failure.message + " " + failure.hint
    assert tunnel.diagnose(t, "") is None
    changed = tunnel.diagnose(t, CHANGED)
    assert changed is not None and "SHA256:B/7Ba9O+0bXLJj+Xjz1Na/32MGdkwleqJ7uMTPDNlgU" \
        in changed.message and changed.error().exit_code == 5


PROBE_REFUSED = "channel 2: open failed: administratively prohibited: open failed\n"
# As ssh 9.2 logs it through LogVerbose.
CONFIRMED = ("debug1: ssh.c:ssh_confirm_remote_forward():1827 (pid=7718): remote forward "
             "success for: listen 8443, connect 127.0.0.1:8088\n")


def test_a_refused_probe_is_no_failure(sovctl_home: Path) -> None:
    """A hardened host (AllowTcpForwarding remote) refuses the probe's -L: that says why the
    probe is skipped, naming the sshd option, and is never given as the reason ssh stopped."""
    t = _tunnel(sovctl_home, via="u@h:2222", remote_port=8443)
    why = tunnel.probe_refused(t, CONFIRMED + PROBE_REFUSED)
    assert why is not None and "AllowTcpForwarding" in why and "127.0.0.1:8443" in why
    assert tunnel.probe_refused(t, CONFIRMED) is None
    assert tunnel.diagnose(t, PROBE_REFUSED) is None
    gone = tunnel.diagnose(t, PROBE_REFUSED + "Connection to h closed by remote host.\n"
                           + PROBE_REFUSED)
    assert gone is not None and not gone.fatal and "closed by remote host" in gone.message
    assert tunnel.forward_confirmed(t, CONFIRMED)
    assert tunnel.forward_confirmed(t, CONFIRMED.replace("listen 8443", "listen 10.0.0.5:8443"))
    assert not tunnel.forward_confirmed(t, CONFIRMED.replace("success", "failure"))
    assert not tunnel.forward_confirmed(t, CONFIRMED.replace("8443", "18443"))


def test_tunnel_refused_without_a_stack(cli) -> None:
    r = cli("tunnel", "--via", "root@127.0.0.1:1", "--accept-host-key")
    assert r.exit_code == 7 and "no stack is running" in r.output
    r = cli("tunnel")
    assert r.exit_code == 2 and "no public host to tunnel to" in r.output


@pytest.mark.usefixtures("models")
def test_plan_with_a_tunnel_requires_the_key_and_a_pinned_host(sovctl_home: Path) -> None:
    from sovctl.audit import checks, stack
    from sovctl.runtime.plan import Plan, build, routes_table

    run(sovctl_home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    home = Home(sovctl_home)
    home.config_path.write_text('[tunnel]\nvia = "tunnel@127.0.0.1:2222"\nremote_port = 8443\n')
    cfg = config.load(home)
    plan = build(home, cfg, ["tiny"])
    assert [p.kind for p in plan.processes] == ["runtime", "gateway", "tunnel"]
    assert plan.host == "127.0.0.1" and plan.api_key_required
    assert routes_table(plan, home).auth_required
    assert Plan.from_json(plan.to_json()) == plan
    dry = run_json(sovctl_home, "serve", "--chat", "tiny", "--dry-run")
    assert dry["data"]["api_key_required"]
    assert "tunnel" in [p["name"] for p in dry["data"]["processes"]]
    # The host key is not pinned: serve refuses before starting anything.
    r = run(sovctl_home, "serve", "--chat", "tiny", "-d", "--port", str(free_port()))
    assert r.returncode == 3 and "no pinned host key" in r.stderr and "--pin-only" in r.stderr
    assert not (sovctl_home / "run" / "state.json").exists()
    # The audit's stack runs without the tunnel, keeps the key, and check 7 judges the public
    # face: unpinned fails; pinned, with the key, passes and says the tunnel was left out.
    configured, run_plan = stack.plans(home, stack.audit_home(home, "t"), cfg, ["tiny"], [])
    assert "tunnel" not in [p.kind for p in run_plan.processes] and run_plan.tunnel is None
    assert run_plan.api_key_required
    c7 = checks.configuration(home, configured, run_plan, None)
    assert not c7.passed and "no host key of [127.0.0.1]:2222 is pinned" in c7.evidence
    assert configured.tunnel is not None
    tunnel.pin(configured.tunnel, [tunnel.HostKey("ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAI"
                                                  "DdtzZQckDl3CBoFdwwl2cHwKE5zoMcXdTyzz1pEqMV6")])
    (home.secrets / "api_key").unlink(missing_ok=True)
    c7 = checks.configuration(home, configured, run_plan, None)
    assert not c7.passed and "does not require the API key" in c7.evidence
    from sovctl.apikey import ensure_api_key

    ensure_api_key(home)
    c7 = checks.configuration(home, configured, run_plan, None)
    assert c7.passed, c7.evidence
    for words in ("requires the API key", "forwards to the gateway (127.0.0.1:8088) alone",
                  "pinned (ssh-ed25519 SHA256:", "left out of this run"):
        assert words in c7.evidence


# -- end to end, through a real sshd ---------------------------------------------------------------

class PublicHost:
    """An OpenSSH server on a free loopback port, with the tunnel's restricted key."""

    def __init__(self, root: Path, allow_tcp_forwarding: str = "yes") -> None:
        root.mkdir()
        self.root, self.port, self.remote_port = root, free_port(), free_port()
        self.user = getpass.getuser()
        self.host_key = root / "host_ed25519"
        self.client_key = root / "client_ed25519"
        for key in (self.host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True)
        # The docs' recipe: this key may forward its one port, and nothing else.
        (root / "authorized_keys").write_text(
            f'restrict,port-forwarding,permitlisten="{self.remote_port}",'
            f'permitopen="127.0.0.1:{self.remote_port}" '
            + (root / "client_ed25519.pub").read_text())
        (root / "sshd_config").write_text("\n".join([
            "ListenAddress 127.0.0.1", f"AuthorizedKeysFile {root / 'authorized_keys'}",
            f"PidFile {root / 'sshd.pid'}", "UsePAM no", "StrictModes no",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password", f"AllowUsers {self.user}",
            f"AllowTcpForwarding {allow_tcp_forwarding}", "GatewayPorts no",
            "ClientAliveInterval 2", "ClientAliveCountMax 2",
            "LogLevel VERBOSE", ""]))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def via(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    def start(self) -> None:
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation
        with (self.root / "sshd.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(self.root / "sshd_config"), "-p",
                 str(self.port), "-h", str(self.host_key)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def listening() -> bool:
            assert self.proc is not None and self.proc.poll() is None, \
                (self.root / "sshd.log").read_text()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, timeout=10, what="sshd listening")

    def stop(self) -> None:
        """The listener and every session it forked (each in a session of its own)."""
        if self.proc is None:
            return
        try:
            family = [psutil.Process(self.proc.pid),
                      *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        self.proc.wait(timeout=10)
        self.proc = None

    def new_host_key(self) -> None:
        for f in (self.host_key, self.host_key.with_suffix(".pub")):
            f.unlink()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(self.host_key)], check=True)


def tunnel_args(host: PublicHost) -> list[str]:
    return ["tunnel", "--via", host.via, "--remote-port", str(host.remote_port),
            "--identity", str(host.client_key), "--accept-host-key"]


class Tunnelled:
    def __init__(self, home: Path, host: PublicHost, added: subprocess.CompletedProcess[str]):
        self.home, self.host, self.added = home, host, added
        self.public = f"http://127.0.0.1:{host.remote_port}"

    def args(self) -> list[str]:
        return tunnel_args(self.host)


@pytest.fixture(scope="module")
def tunnelled(tmp_path_factory: pytest.TempPathFactory, models: Path) -> Iterator[Tunnelled]:
    if not SSHD.is_file() or shutil.which("ssh") is None:
        pytest.fail("the tunnel tests need OpenSSH's server and client (Debian: apt-get "
                    "install openssh-server openssh-client)", pytrace=False)
    root = tmp_path_factory.mktemp("tunnel")
    host = PublicHost(root / "public-host")
    home = root / "home"
    host.start()
    try:
        run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
        served = run(home, "serve", "--chat", "tiny", "-d", "--port", str(free_port()), env=FAST)
        assert served.returncode == 0, served.stderr
        yield Tunnelled(home, host, run(home, *tunnel_args(host), env=FAST, timeout=120))
    finally:
        run(home, "stop")
        host.stop()


def _pin_in_a_terminal(home: Path, answer: str) -> tuple[int, str]:
    """`sovctl tunnel --pin-only` with a terminal on stdin and stderr, answering its question."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "sovctl", "tunnel", "--pin-only"],
                            stdin=slave, stdout=subprocess.PIPE, stderr=slave,
                            env={**os.environ, "SOVCTL_HOME": str(home)})
    os.close(slave)
    seen = b""
    try:
        while b"Pin this host key?" not in seen:
            ready, _, _ = select.select([master], [], [], 30)
            assert ready, f"no question asked: {seen!r}"
            seen += os.read(master, 4096)
        os.write(master, answer.encode() + b"\n")
        out = proc.communicate(timeout=30)[0].decode()
        while select.select([master], [], [], 1)[0]:  # the rest of stderr
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the terminal's other end is closed: all is read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    return proc.returncode, seen.decode() + out


@pytest.mark.slow
@pytest.mark.usefixtures("models")
def test_serve_starts_the_tunnel_of_sovctl_toml(tmp_path: Path) -> None:
    host = PublicHost(tmp_path / "public-host")
    home = tmp_path / "home"
    home.mkdir()
    (home / "sovctl.toml").write_text(
        f'[tunnel]\nvia = "{host.via}"\nremote_port = {host.remote_port}\n'
        f'identity = "{host.client_key}"\n')
    host.start()
    try:
        code, said = _pin_in_a_terminal(home, "n")
        assert code == 2 and "SHA256:" in said and "was not accepted" in said
        assert not (home / "tunnel" / "known_hosts").exists()
        code, said = _pin_in_a_terminal(home, "y")
        assert code == 0 and f"pinned [127.0.0.1]:{host.port}: ssh-ed25519 SHA256:" in said
        run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
        served = run(home, "serve", "--chat", "tiny", "-d", "--port", str(free_port()), env=FAST)
        assert served.returncode == 0, served.stderr
        assert "shown once" in served.stdout
        assert processes(home)["tunnel"]["status"] == "up"
        key = (home / "secrets" / "api_key").read_text().strip()
        public = f"http://127.0.0.1:{host.remote_port}/v1/models"
        assert httpx.get(public, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert httpx.get(public).status_code == 401
    finally:
        run(home, "stop")
        host.stop()


@pytest.mark.slow
def test_public_side_needs_the_key(tunnelled: Tunnelled) -> None:
    added, home = tunnelled.added, tunnelled.home
    assert added.returncode == 0, added.stderr + added.stdout
    key = (home / "secrets" / "api_key").read_text().strip()
    assert "shown once" in added.stdout and key in added.stdout
    assert f"tunnel up over {tunnelled.host.via} (ssh pid" in added.stdout
    # The pinned key is the host's own, as ssh-keygen shows it, in a file only we can read.
    known_hosts = home / "tunnel" / "known_hosts"
    assert stat.S_IMODE(known_hosts.stat().st_mode) == 0o600
    own = subprocess.run(["ssh-keygen", "-lf", str(tunnelled.host.host_key) + ".pub"],
                         capture_output=True, text=True, check=True).stdout.split()[1]
    assert own in added.stdout
    procs = processes(home)
    assert procs["tunnel"]["status"] == "up" and procs["tunnel"]["kind"] == "tunnel"
    assert str(procs["tunnel"]["pid"]) in added.stdout
    assert "end-to-end probe: a request through the public host reaches the gateway" \
        in added.stdout
    assert not procs["tunnel"]["probe_skipped"]
    assert psutil.Process(procs["tunnel"]["pid"]).name() == "ssh"
    # Through the public host's port: the key is required there, /health stays open.
    r = httpx.get(tunnelled.public + "/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["tiny"]
    r = httpx.get(tunnelled.public + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(tunnelled.public + "/v1/models",
                     headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(tunnelled.public + "/health").status_code == 200
    r = httpx.post(tunnelled.public + "/v1/completions", timeout=60,
                   headers={"Authorization": f"Bearer {key}"},
                   json={"model": "tiny", "prompt": "Once", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
    # The public side reaches the gateway and nothing else.
    gateway = procs["gateway"]["port"]
    plan = (home / "run" / "plan.json").read_text()
    assert f"{tunnelled.host.remote_port}:127.0.0.1:{gateway}" in plan
    # Asking again changes nothing.
    again = run(home, *tunnelled.args(), env=FAST)
    assert again.returncode == 0 and "already up" in again.stdout
    assert processes(home)["tunnel"]["pid"] == procs["tunnel"]["pid"]


@pytest.mark.slow
def test_killed_ssh_comes_back(tunnelled: Tunnelled) -> None:
    home = tunnelled.home
    before = processes(home)["tunnel"]
    os.kill(before["pid"], signal.SIGKILL)
    after = wait_for(lambda: (p := processes(home)["tunnel"])["status"] == "up"
                     and p["restarts"] > before["restarts"] and p, timeout=60,
                     what="the tunnel back up")
    assert after["pid"] != before["pid"]
    key = (home / "secrets" / "api_key").read_text().strip()
    r = httpx.get(tunnelled.public + "/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200


@pytest.mark.slow
def test_changed_host_key_stops_the_tunnel(tunnelled: Tunnelled) -> None:
    home, host = tunnelled.home, tunnelled.host
    host.stop()
    host.new_host_key()
    host.start()
    failed = wait_for(lambda: (p := processes(home)["tunnel"])["status"] == "failed" and p,
                      timeout=60, what="the tunnel marked failed")
    assert "host key" in failed["last_exit"] and "changed" in failed["last_exit"]
    status = run_json(home, "status")
    assert status["data"]["running"]  # the rest of the stack keeps serving locally
    log = run(home, "logs", "tunnel").stdout
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in log
    # Not retried: it stays failed.
    time.sleep(2)
    assert processes(home)["tunnel"]["restarts"] == failed["restarts"]
    again = run(home, *tunnelled.args(), env=FAST)
    assert again.returncode == 5, again.stderr
    assert "the host key of" in again.stderr and "changed" in again.stderr
    assert "ssh-keygen -R" in again.stderr


@pytest.mark.slow
@pytest.mark.usefixtures("models")
def test_a_hardened_host_without_the_probe(tmp_path: Path) -> None:
    """sshd with AllowTcpForwarding remote, the least a reverse tunnel needs, refuses the
    probe's local forward: the tunnel starts all the same, its public port carries requests to
    the gateway, and everything that reports on it says why the probe is skipped."""
    host = PublicHost(tmp_path / "public-host", allow_tcp_forwarding="remote")
    home = tmp_path / "home"
    host.start()
    try:
        run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
        served = run(home, "serve", "--chat", "tiny", "-d", "--port", str(free_port()), env=FAST)
        assert served.returncode == 0, served.stderr
        added = run_json(home, *tunnel_args(host), env=FAST)
        assert added["ok"], added["_stderr"]
        why = added["data"]["probe_skipped"]
        assert "AllowTcpForwarding" in why and "refuses the local forward" in why
        tunnel_proc = processes(home)["tunnel"]
        assert tunnel_proc["status"] == "up" and tunnel_proc["probe_skipped"] == why
        assert "end-to-end probe skipped" in run(home, "logs").stdout
        table = run(home, "status").stdout
        assert "tunnel: end-to-end probe skipped:" in table and "AllowTcpForwarding" in table
        again = run(home, *tunnel_args(host), env=FAST)
        assert again.returncode == 0 and "already up" in again.stdout
        assert "end-to-end probe: skipped:" in again.stdout
        # Through the public host's port: the remote forward the host confirmed is there.
        key = (home / "secrets" / "api_key").read_text().strip()
        public = f"http://127.0.0.1:{host.remote_port}/v1/models"
        r = httpx.get(public, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["tiny"]
        assert httpx.get(public).status_code == 401
    finally:
        run(home, "stop")
        host.stop()
