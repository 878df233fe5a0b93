"""`sovctl pull` reads the downloaded bytes once: it hashes them as they arrive.

    .venv/bin/python benchmarks/bench_pull_onepass.py [--file MODEL.gguf] [--repeat 3]

A hub (sovctl's mirror server, serving FILE under a made-up repo and commit) runs in a child
process on 127.0.0.1; this process pulls from it with sovctl's core and measures, from
/proc/self/io, how many bytes it read back from files (`rchar`: read(2) on files, not on
sockets) and wrote (`wchar`). A pull that hashed in a second pass would read the whole file
back (rchar/size >= 1); a one-pass pull reads ~0. For comparison it runs the two-pass way too:
download to a file without hashing, then hash that file. Times are medians of --repeat runs.
The pull's time includes reading the GGUF header facts (shown apart: parsing a large
vocabulary with the gguf package takes a while). Exit status 1 when a pull read back more
than 10% of the file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = "bench/onepass"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FILE = Path(os.environ.get("SOVCTL_TEST_MODELS", ROOT.parent / "shared" / "models")) / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"


def io_counters() -> tuple[int, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"]), int(fields["wchar"])


def serve(path: Path) -> None:
    """Child process: serve `path` as REPO at COMMIT; print the port, then serve forever."""
    from sovctl.store.mirror import Catalog, MirrorFile, make_server

    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    cat = Catalog([MirrorFile(REPO, "main", COMMIT, path.name, h.hexdigest(),
                              path.stat().st_size, path, "2024-01-01T00:00:00Z")])
    server = make_server(cat, "127.0.0.1", 0)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def pull_once(endpoint: str, filename: str, home: Path) -> dict[str, float]:
    from sovctl.home import Home
    from sovctl.store.pull import pull

    marks: dict[str, float] = {}

    def progress(description: str, total: int | None, done: int):  # type: ignore[no-untyped-def]
        def advance(n: int) -> None:
            now = time.perf_counter()
            marks.setdefault("first_byte", now)
            marks["last_byte"] = now

        return advance

    r0, w0 = io_counters()
    start = time.perf_counter()
    result = pull(Home(home), f"hf://{REPO}/{filename}", endpoint=endpoint, progress=progress)
    end = time.perf_counter()
    r1, w1 = io_counters()
    assert result.action == "downloaded", result.action
    return {"total": end - start, "stream": marks["last_byte"] - marks["first_byte"],
            "rchar": r1 - r0, "wchar": w1 - w0}


def two_pass_once(url: str, dest: Path) -> dict[str, float]:
    import httpx

    from sovctl.store.blobs import hash_file

    r0, w0 = io_counters()
    with httpx.stream("GET", url, timeout=60) as r, dest.open("wb") as f:
        start = None
        for chunk in r.iter_raw():
            start = start or time.perf_counter()  # from the first byte, as for the pull
            f.write(chunk)
    mid = time.perf_counter()
    hash_file(dest)
    end = time.perf_counter()
    r1, w1 = io_counters()
    assert start is not None
    return {"download": mid - start, "hash": end - mid, "total": end - start,
            "rchar": r1 - r0, "wchar": w1 - w0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, default=DEFAULT_FILE)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    path = args.file.resolve()
    size = path.stat().st_size
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        endpoint = f"http://127.0.0.1:{int(child.stdout.readline())}"
        url = f"{endpoint}/{REPO}/resolve/{COMMIT}/{path.name}"
        with tempfile.TemporaryDirectory(prefix="sovctl-bench-pull-") as tmp:
            tmpdir = Path(tmp)
            pull_once(endpoint, path.name, tmpdir / "warm-up")  # imports, page cache
            two_pass_once(url, tmpdir / "warm-up.bin")
            pulls, twos = [], []
            for i in range(args.repeat):
                pulls.append(pull_once(endpoint, path.name, tmpdir / f"home-{i}"))
                twos.append(two_pass_once(url, tmpdir / f"two-pass-{i}.bin"))
            from sovctl.store.gguf_info import read_facts

            start = time.perf_counter()
            read_facts(path)
            facts = time.perf_counter() - start
    finally:
        child.terminate()
        child.wait(timeout=10)

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    mib = size / (1024 * 1024)
    print(f"file: {path.name}, {mib:.1f} MiB, {args.repeat} runs each, medians")
    print("sovctl pull (hash while streaming):")
    print(f"  stream + hash       : {med(pulls, 'stream'):6.3f} s  "
          f"{mib / med(pulls, 'stream'):7.1f} MiB/s  (first byte to last byte)")
    print(f"  whole pull          : {med(pulls, 'total'):6.3f} s  (with resolving the commit, "
          f"fsync, the lock, and the GGUF header facts, alone {facts:.3f} s)")
    print(f"  bytes read back     : {med(pulls, 'rchar'):>12,.0f}  "
          f"= {med(pulls, 'rchar') / size:.3f} x file size")
    print(f"  bytes written       : {med(pulls, 'wchar'):>12,.0f}  "
          f"= {med(pulls, 'wchar') / size:.3f} x file size")
    print("two passes (download to a file, then hash it):")
    print(f"  download            : {med(twos, 'download'):6.3f} s")
    print(f"  hash                : {med(twos, 'hash'):6.3f} s")
    print(f"  download + hash     : {med(twos, 'total'):6.3f} s")
    print(f"  bytes read back     : {med(twos, 'rchar'):>12,.0f}  "
          f"= {med(twos, 'rchar') / size:.3f} x file size")
    ratio = med(pulls, "stream") / med(twos, "total")
    print(f"ratio pull stream+hash / (download + separate hash): {ratio:.2f}")
    ok = med(pulls, "rchar") < 0.1 * size
    print("PASS: the pull read the downloaded bytes once" if ok else
          "FAIL: the pull read the file back after downloading it")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
