"""Start-up cost of `sovctl --help` against `python -c "import typer"`, in one run.

    .venv/bin/python benchmarks/bench_help.py [--repeat 21]

Each is run as a fresh process, alternating, `--repeat` times; the figure is the median wall
time. The ratio is sovctl's over typer's (target: at most 1.5). When the ratio misses the
target, the modules that cost sovctl the most to import (`python -X importtime`) are listed,
the place to look for an import to make lazy. Exit status 1 when the ratio misses the target.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _common import sovctl_command  # benchmarks/ is on the path of a script run from it

TARGET = 1.5




def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def slowest_imports(env: dict[str, str], top: int = 15) -> list[tuple[int, str]]:
    """(cumulative microseconds, module) of the costliest top-level imports of `--help`."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "sovctl", "--help"],
                          capture_output=True, text=True, env=env, check=True)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:"):].split("|"))
        rows.append((int(cumulative), name))
    return sorted(rows, reverse=True)[:top]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=21)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sovctl-bench-help-") as home:
        env = {**os.environ, "SOVCTL_HOME": home}
        help_cmd = [*sovctl_command(), "--help"]
        typer_cmd = [sys.executable, "-c", "import typer"]
        for cmd in (help_cmd, typer_cmd):  # warm the file cache and the .pyc files
            timed(cmd, env)
        ours, theirs = [], []
        for _ in range(args.repeat):
            ours.append(timed(help_cmd, env))
            theirs.append(timed(typer_cmd, env))
        t_ours, t_theirs = statistics.median(ours), statistics.median(theirs)
        ratio = t_ours / t_theirs
        print(f"{args.repeat} runs each, median wall time")
        typer_label = 'python -c "import typer"'
        print(f"{'sovctl --help':28}: {t_ours * 1000:7.1f} ms")
        print(f"{typer_label:28}: {t_theirs * 1000:7.1f} ms")
        print(f"ratio: {ratio:.2f} (target <= {TARGET})")
        ok = ratio <= TARGET
        if not ok:
            print("costliest imports of `sovctl --help` (cumulative, python -X importtime):")
            for us, name in slowest_imports(env):
                print(f"  {us / 1000:7.1f} ms  {name}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
