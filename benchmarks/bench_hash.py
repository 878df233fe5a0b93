"""`sovctl pull FILE` against `cp FILE DEST && sync`, and `sovctl verify NAME` against
`openssl dgst -sha256`, on the same 1 GiB GGUF, in one run.

    .venv/bin/python benchmarks/bench_hash.py [--size-mib 1024] [--vocab 0] [--repeat 3]
                                              [--dir DIR]

The file is a valid GGUF (written with the `gguf` package: one large F16 tensor, and
`--vocab` tokens in its header, as a real model has tens of thousands). Every command runs
as a fresh process of the installed `sovctl` console script, start-up included; the pairs
alternate, `--repeat` times each, after a warm-up, all from the page cache; each figure is a
median. Each pull goes into a fresh SOVCTL_HOME beside the file (the same disk as `cp`'s
copy), and `sync` runs untimed before each timed command so that no command waits for
another's writes. Targets: pull at most 1.3x `cp` + `sync`, verify at most 1.3x `openssl`.

For context it also prints the in-process hashing core against openssl, and how long the
GGUF header takes to parse (part of every pull; it grows with the vocabulary). Exit status 1
when a ratio misses its target.
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

TARGET = 1.3
NAME = "big"




def make_gguf(path: Path, size: int, vocab: int) -> None:
    """A valid GGUF of about `size` bytes; its tensor repeats one random 64 MiB block."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType

    block = np.frombuffer(os.urandom(64 * 1024 * 1024), dtype=np.uint8)
    row = 4096
    data = np.resize(block, size // row * row).view(np.float16).reshape(-1, row // 2)
    w = GGUFWriter(path, "llama")
    w.add_context_length(4096)
    w.add_file_type(LlamaFileType.MOSTLY_F16)
    if vocab:
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"token-{i}" for i in range(vocab)])
        w.add_token_types([1] * vocab)
    w.add_tensor("token_embd.weight", data, raw_dtype=GGMLQuantizationType.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=0,
                    help="tokens in the header (a real model: 32000 to 260000)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the files")
    args = ap.parse_args()
    if shutil.which("openssl") is None:
        print("openssl not found", file=sys.stderr)
        return 2
    from sovctl.store.blobs import hash_file
    from sovctl.store.gguf_info import read_facts

    sovctl = sovctl_command()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="sovctl-bench-hash-") as tmp:
        root = Path(tmp)
        src = root / "model.gguf"
        make_gguf(src, args.size_mib * 1024 * 1024, args.vocab)
        size = src.stat().st_size
        dest = root / "copy.gguf"
        openssl = ["openssl", "dgst", "-sha256"]

        def pull(i: int) -> float:
            home = root / f"home-{i}"
            t = timed([*sovctl, "pull", str(src), "--name", NAME],
                      {**os.environ, "SOVCTL_HOME": str(home)})
            shutil.rmtree(home)
            return t

        def copy() -> float:
            t = timed(["sh", "-c", f"cp '{src}' '{dest}' && sync"])
            dest.unlink()
            return t

        pull(-1)  # warm-up: imports compiled, the source in the page cache
        copy()
        pulls, copies = [], []
        for i in range(args.repeat):
            pulls.append(pull(i))
            copies.append(copy())

        home = root / "home"
        env = {**os.environ, "SOVCTL_HOME": str(home)}
        subprocess.run([*sovctl, "pull", str(src), "--name", NAME], check=True,
                       stdout=subprocess.DEVNULL, env=env)
        [blob] = (home / "store" / "blobs").iterdir()
        timed([*sovctl, "verify", NAME], env)  # warm-up
        verifies, digests, cores = [], [], []
        for _ in range(args.repeat):
            verifies.append(timed([*sovctl, "verify", NAME], env))
            digests.append(timed([*openssl, str(blob)]))
            start = time.perf_counter()
            hash_file(blob)
            cores.append(time.perf_counter() - start)
        start = time.perf_counter()
        read_facts(src)
        header = time.perf_counter() - start

    med = statistics.median
    pull_ratio = med(pulls) / med(copies)
    verify_ratio = med(verifies) / med(digests)
    print(f"file: GGUF, {size / 2**20:.0f} MiB, {args.vocab} tokens in its header; "
          f"{args.repeat} runs each, medians (range)")

    def row(label: str, xs: list[float]) -> None:
        print(f"  {label:34}: {med(xs):6.3f} s  ({min(xs):.3f} to {max(xs):.3f})")

    row("sovctl pull FILE (whole command)", pulls)
    row("cp FILE DEST && sync", copies)
    row("sovctl verify NAME (whole command)", verifies)
    row("openssl dgst -sha256", digests)
    row("hash_file, in-process (context)", cores)
    print(f"  {'GGUF header parse (in every pull)':34}: {header:6.3f} s")
    print(f"ratio pull / (cp + sync)  : {pull_ratio:.2f} (target <= {TARGET})")
    print(f"ratio verify / openssl    : {verify_ratio:.2f} (target <= {TARGET})")
    ok = pull_ratio <= TARGET and verify_ratio <= TARGET
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
