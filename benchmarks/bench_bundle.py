"""`sovctl bundle create` against `tar cf` of the same files plus their `sha256sum`, in one run.

    .venv/bin/python benchmarks/bench_bundle.py [--size-mib 1024] [--repeat 3] [--dir DIR]

The stack bundled: a home holding the test models (SmolLM2 with its projector, stories260K,
MiniLM) and a synthetic GGUF of --size-mib (a real stack's weights run to gigabytes; the
file is made as benchmarks/bench_hash.py makes its own), its sovctl.toml, and this
environment's ~100 wheels. Both sides handle the same files: the baseline archives a finished
bundle of this stack (`tar cf`, then `sha256sum` of every file, then `sync`, since a bundle is
on disk when `bundle create` returns); `sovctl bundle create` (a fresh process of the installed
console script, start-up included) reads the store and the installed distributions, packs the
wheels, hashes everything once, writes the bill of materials and the manifest, and syncs.

Not in the ratio, measured apart: building sovctl's own wheel from this checkout (an editable
install has no files to pack; `pip wheel` runs the build backend). The timed runs take that
wheel, built once beforehand, through `--wheels`, and nothing is downloaded: a bundle is made
from what is installed. The pairs alternate, `--repeat` times, after a warm-up, from the page
cache; `sync` runs untimed before each. Target: ratio at most 1.3. Exit status 1 when missed.
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

from _common import sovctl_command  # benchmarks/ is on the path of a script run from it
from bench_hash import make_gguf

TARGET = 1.3
ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("SOVCTL_TEST_MODELS", ROOT.parent / "shared" / "models"))


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=env)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="the synthetic model's size")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the files")
    args = ap.parse_args()
    sovctl = sovctl_command()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="sovctl-bench-bundle-") as tmp:
        root = Path(tmp)
        home = root / "home"
        env = {**os.environ, "SOVCTL_HOME": str(home)}

        def pull(*argv: str) -> None:
            subprocess.run([*sovctl, "pull", *argv], check=True, stdout=subprocess.DEVNULL,
                           env=env)

        big = root / "big.gguf"
        make_gguf(big, args.size_mib * 1024 * 1024, 0)
        pull(str(big), "--name", "big")
        big.unlink()
        pull(str(MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"), "--name", "smol",
             "--mmproj", str(MODELS / "mmproj-tiny-random-f16.gguf"))
        pull(str(MODELS / "stories260K.gguf"), "--name", "tiny")
        pull(str(MODELS / "all-MiniLM-L6-v2-f16.gguf"), "--name", "minilm")
        (home / "sovctl.toml").write_text('[models.smol]\nrole = "chat"\n')

        prebuilt = root / "prebuilt"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                        "--no-build-isolation", "--no-index", "--quiet", "--wheel-dir",
                        str(prebuilt), str(ROOT)], check=True)
        build = time.perf_counter() - start

        reference = root / "reference"  # the finished bundle the baseline archives
        subprocess.run([*sovctl, "bundle", "create", str(reference), "--wheels", str(prebuilt)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        files = sorted(str(p) for p in reference.rglob("*") if p.is_file())
        size = sum(Path(f).stat().st_size for f in files)
        archive = root / "bundle.tar"

        def create(i: int) -> float:
            out = root / f"out-{i}"
            t = timed([*sovctl, "bundle", "create", str(out), "--wheels", str(prebuilt)], env)
            shutil.rmtree(out)
            return t

        def tar() -> float:
            subprocess.run(["sync"], check=True)
            start = time.perf_counter()
            subprocess.run(["tar", "cf", str(archive), "-C", str(reference), "."], check=True)
            subprocess.run(["sha256sum", *files], check=True, stdout=subprocess.DEVNULL)
            subprocess.run(["sync"], check=True)
            t = time.perf_counter() - start
            archive.unlink()
            return t

        create(-1)  # warm-up: imports compiled, everything read once into the page cache
        tar()
        creates, tars = [], []
        for i in range(args.repeat):
            creates.append(create(i))
            tars.append(tar())

        start = time.perf_counter()
        subprocess.run([*sovctl, "bundle", "create", str(root / "dry"), "--dry-run",
                        "--wheels", str(prebuilt)], check=True, stdout=subprocess.DEVNULL, env=env)
        dry = time.perf_counter() - start

    med = statistics.median
    ratio = med(creates) / med(tars)
    print(f"bundle: {len(files)} files, {size / 2**20:.0f} MiB (a {args.size_mib} MiB model, "
          f"the test models, {len([f for f in files if f.endswith('.whl')])} wheels); "
          f"{args.repeat} runs each, medians (range)")

    def row(label: str, xs: list[float]) -> None:
        print(f"  {label:44}: {med(xs):6.3f} s  ({min(xs):.3f} to {max(xs):.3f})")

    row("sovctl bundle create (whole command)", creates)
    row("tar cf + sha256sum + sync (same files)", tars)
    print(f"  {'bundle create --dry-run (plan only)':44}: {dry:6.3f} s")
    print(f"  {'sovctl wheel build, apart (not in ratio)':44}: {build:6.3f} s")
    print(f"ratio create / (tar + sha256sum + sync): {ratio:.2f} (target <= {TARGET})")
    ok = ratio <= TARGET
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
