"""Fidelity of `sovctl bench` against llama.cpp's own `llama-bench`, on the same settings.

    .venv/bin/python benchmarks/bench_fidelity.py /path/to/llama-bench \\
        [--model PATH]... [-t 2] [-b 2048] [-p 512] [-n 128] [-r 5] [--rounds 3] [--no-repack]

For each model, llama-bench and `sovctl bench` run alternately `--rounds` times, each as a
fresh process with the same threads, batch sizes, GPU layers (0), flash attention (off) and
weight repacking. The figure per tool is the median over rounds of its mean tokens/s; the
ratio is sovctl's over llama-bench's (target: within 10%, 0.90 to 1.10). Exit status 1 when
a ratio misses the target.

llama-bench is built from the llama.cpp sources vendored in llama-cpp-python's sdist:

    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36
    tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36
    cmake -S vendor/llama.cpp -B build -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
    cmake --build build --target llama-bench -j2

By default llama-bench runs on the llama.cpp and ggml libraries of the installed
llama-cpp-python (LD_LIBRARY_PATH), so both tools time the same kernels and only the method
differs; `--own-libs` runs it on the libraries it was built with (compiler flags differ).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET = 0.10
MODELS = Path(os.environ.get("SOVCTL_TEST_MODELS",
                             Path(__file__).resolve().parents[2] / "shared" / "models"))
DEFAULT_MODELS = [MODELS / "stories260K.gguf", MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"]


def llama_cpp_lib_dir() -> str:
    import llama_cpp

    return str(Path(llama_cpp.__file__).parent / "lib")


def run_llama_bench(exe: str, model: Path, a: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ)
    if not a.own_libs:
        env["LD_LIBRARY_PATH"] = llama_cpp_lib_dir()
    cmd = [exe, "-m", str(model), "-t", str(a.threads), "-b", str(a.batch), "-ub", str(a.ubatch),
           "-p", str(a.n_prompt), "-n", str(a.n_gen), "-r", str(a.reps), "-ngl", "0",
           "-fa", "0", "--repack", "0" if a.no_repack else "1", "-o", "json"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    figures = {}
    for test in json.loads(out):
        key = "pp" if test["n_prompt"] > 0 else "tg"
        figures[key] = float(test["avg_ts"])
    return figures


def run_sovctl(home: Path, name: str, a: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, "-m", "sovctl", "--json", "bench", name, "-t", str(a.threads),
           "-b", str(a.batch), "-ub", str(a.ubatch), "-p", str(a.n_prompt), "-n", str(a.n_gen),
           "-r", str(a.reps), "-ngl", "0", "--no-repack" if a.no_repack else "--repack"]
    env = {**os.environ, "SOVCTL_HOME": str(home),
           "SOVCTL_BENCH__MEMORY_BANDWIDTH_GBS": "1"}  # no memory test between timings
    doc = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True,
                                    check=True).stdout)
    (res,) = doc["data"]["results"]
    return {"pp": res["pp"]["tps_mean"], "tg": res["tg"]["tps_mean"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("llama_bench", help="path to the llama-bench executable")
    ap.add_argument("--model", action="append", type=Path,
                    help="GGUF file (repeatable) [default: stories260K and SmolLM2]")
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("-b", "--batch", type=int, default=2048)
    ap.add_argument("-ub", "--ubatch", type=int, default=512)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-repack", action="store_true",
                    help="both tools without weight repacking (needed where AMX crashes)")
    ap.add_argument("--own-libs", action="store_true",
                    help="run llama-bench on its own build of llama.cpp/ggml")
    a = ap.parse_args()

    failures = 0
    print(f"threads {a.threads}, batch {a.batch}/{a.ubatch}, pp{a.n_prompt}, tg{a.n_gen}, "
          f"{a.reps} reps, {a.rounds} alternating rounds, repack {not a.no_repack}, "
          f"llama-bench libs: {'its own' if a.own_libs else 'llama-cpp-python' + chr(39) + 's'}")
    print(f"{'model':32} {'test':6} {'llama-bench':>12} {'sovctl':>12} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        for model in a.model or DEFAULT_MODELS:
            name = model.stem
            subprocess.run([sys.executable, "-m", "sovctl", "pull", str(model), "--name", name],
                           env={**os.environ, "SOVCTL_HOME": str(home)}, check=True,
                           capture_output=True)
            lb: dict[str, list[float]] = {"pp": [], "tg": []}
            sv: dict[str, list[float]] = {"pp": [], "tg": []}
            for _ in range(a.rounds):
                for k, v in run_llama_bench(a.llama_bench, model, a).items():
                    lb[k].append(v)
                for k, v in run_sovctl(home, name, a).items():
                    sv[k].append(v)
            for key, n in (("pp", a.n_prompt), ("tg", a.n_gen)):
                ref, ours = statistics.median(lb[key]), statistics.median(sv[key])
                ratio = ours / ref
                ok = abs(ratio - 1) <= TARGET
                failures += not ok
                print(f"{name:32} {key}{n:<4} {ref:12.2f} {ours:12.2f} {ratio:7.3f}"
                      f"{'' if ok else '  MISSES the 10% target'}")
                print(f"{'':32} {'':6} rounds: llama-bench {[round(x, 1) for x in lb[key]]}, "
                      f"sovctl {[round(x, 1) for x in sv[key]]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
