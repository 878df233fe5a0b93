"""Hashing throughput of `sovctl verify` against `sha256sum`, on the same 1 GiB file, in one run.

    .venv/bin/python benchmarks/bench_hash.py [--size-mib 1024] [--repeat 3] [--dir DIR]

Both read the file from the page cache (a warm-up pass runs first), alternating, `--repeat`
times each; the figure per tool is its median. The ratio is sovctl's throughput over
sha256sum's (target: at least 0.95). It also times the whole `sovctl verify` command on a store
whose one blob is that file, so the cost around the hashing shows too. Exit status 1 when the
ratio misses the target.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

from sovctl.store.blobs import hash_file

TARGET = 0.95


def make_file(path: Path, size: int) -> None:
    block = os.urandom(64 * 1024 * 1024)
    with path.open("wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def time_sha256sum(path: Path) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(["sha256sum", str(path)], check=True, capture_output=True, text=True)
    return time.perf_counter() - start, out.stdout.split()[0]


def time_hash_file(path: Path) -> tuple[float, str]:
    start = time.perf_counter()
    digest, _ = hash_file(path)
    return time.perf_counter() - start, digest


def make_store(root: Path, data: Path, digest: str, size: int) -> Path:
    """A sovctl home whose one name pins `data` (moved in as its blob)."""
    home = root / "home"
    blobs = home / "store" / "blobs"
    blobs.mkdir(parents=True)
    blob = blobs / f"sha256-{digest}"
    os.replace(data, blob)
    entry = {"sha256": digest, "size": size, "source": "file", "ref": str(data),
             "pulled_at": "2024-01-01T00:00:00Z", "digest_from": "computed"}
    doc = {"version": 1, "models": {"big": entry}}
    (home / "sovctl.lock").write_text(tomli_w.dumps(doc))
    return home


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the test file")
    args = ap.parse_args()
    if shutil.which("sha256sum") is None:
        print("sha256sum not found", file=sys.stderr)
        return 2
    size = args.size_mib * 1024 * 1024
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="sovctl-bench-hash-") as tmp:
        path = Path(tmp) / "data.bin"
        make_file(path, size)
        _, expected = time_sha256sum(path)  # warm-up: the file is now in the page cache
        ours, theirs = [], []
        for _ in range(args.repeat):
            t, d = time_hash_file(path)
            assert d == expected, (d, expected)
            ours.append(t)
            t, d = time_sha256sum(path)
            theirs.append(t)
        home = make_store(Path(tmp), path, expected, size)
        cli = []
        sovctl = [sys.executable, "-m", "sovctl", "--home", str(home), "verify"]
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run(sovctl, check=True, capture_output=True)
            cli.append(time.perf_counter() - start)

    mib = size / (1024 * 1024)
    t_ours, t_theirs, t_cli = (statistics.median(x) for x in (ours, theirs, cli))
    ratio = t_theirs / t_ours  # throughput ratio: (size / t_ours) / (size / t_theirs)
    print(f"file: {mib:.0f} MiB, {args.repeat} runs each, medians")
    print(f"sovctl hash_file     : {t_ours:7.3f} s  {mib / t_ours:8.1f} MiB/s")
    print(f"sha256sum            : {t_theirs:7.3f} s  {mib / t_theirs:8.1f} MiB/s")
    print(f"sovctl verify (CLI)  : {t_cli:7.3f} s  {mib / t_cli:8.1f} MiB/s  (whole command)")
    print(f"ratio hash_file/sha256sum throughput: {ratio:.2f} (target >= {TARGET})")
    print(f"ratio verify CLI/sha256sum throughput: {t_theirs / t_cli:.2f}")
    ok = ratio >= TARGET
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
