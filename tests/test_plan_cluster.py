"""`sovctl plan` for the [cluster] model: llama.cpp's split of its layers over the RPC workers'
free memory, what each device then holds, and the fit over all of them.

The split's arithmetic is checked by hand on made-up shapes; the CLI against real
ggml-rpc-server workers on loopback (and a closed loopback port as a dead one), or with
--worker-memory, which asks no worker.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import CHAT_MODEL
from tests.helpers import run, run_json, wait_for

from sovctl import sizing
from sovctl.errors import ExitCode
from sovctl.runtime import cluster
from sovctl.runtime.ports import free_port
from sovctl.sizing import Budget, Device, ModelShape

MiB = 1 << 20
GiB = 1 << 30


def shape(n_layer: int = 3, tied: int = 0) -> ModelShape:
    return ModelShape(
        label="made-up", architecture="llama", file_size=0, parameters=0, weights_bytes=0,
        n_layer=n_layer, layer_bytes=tuple(100 * (i + 1) for i in range(n_layer)),
        input_bytes=50, output_bytes=40, tied_bytes=tied,
        kv_layer_bytes=(10,) * n_layer, n_embd=8, n_head=2, n_ff=16, n_vocab=32,
        context_length=1024, embedding=False)


RAM = Budget(8 * GiB, "from --ram", 0, "from --vram", 0)


# -- the split, by hand ----------------------------------------------------------------------------
def test_split_follows_llama_cpp_free_memory_proportions() -> None:
    # 3 layers and the output layer over devices of free 3:1: the split points are 0.75 and 1;
    # layer il goes to the first point above il/4 (0, .25, .5 -> A; .75 -> B, not A: upper
    # bound), so A holds every block and B only the output layer.
    sp = sizing.split(shape(), 64, 2, [Device("A", 300_000), Device("B", 100_000)], RAM)
    a, b = sp.devices
    assert (a.layers, a.output) == ((0, 1, 2), False)
    assert (b.layers, b.output) == ((3,), True)
    # compute: micro-batch min(512, 64 x 2) = 128: 4 x 128 x (8 x 8 + 2 x 16) + 4 x 32 x 2
    compute = 4 * 128 * 96 + 256
    assert compute == 49_408
    # A: blocks 100 + 200 + 300; KV 3 layers x 10 bytes x 128 tokens
    assert (a.weights, a.kv, a.compute, a.overhead) == (600, 3840, compute, 0)
    assert a.total == 600 + 3840 + 49_408 and a.usable == 270_000 and a.fits
    assert (b.weights, b.kv, b.compute, b.total, b.usable) == (40, 0, compute, 49_448, 90_000)
    # the head: the input embeddings, its own compute buffer and the runtime
    h = sp.head
    assert (h.layers, h.weights, h.kv, h.compute) == ((), 50, 0, compute)
    assert h.total == 50 + compute + 128 * MiB and h.usable == int(8 * GiB * 0.9) and h.fits
    assert sp.fits and sp.offloaded == 4


def test_split_overflow_tied_head_and_gpu_overhead() -> None:
    # Free 1:3 now: points .25 and 1; il/4 = 0 -> A, .25 -> B (upper bound), .5, .75 -> B.
    gpu = Device("head GPU", 300_000, overhead=5_000)
    sp = sizing.split(shape(tied=7), 64, 2, [Device("A", 100_000), gpu], RAM)
    a, g = sp.devices
    assert a.layers == (0,) and g.layers == (1, 2, 3)
    # a tied head is a copy of the token embeddings where the output layer goes
    assert g.weights == 200 + 300 + 40 + 7 and g.kv == 2 * 10 * 128 and g.overhead == 5_000
    assert g.total == 547 + 2560 + 49_408 + 5_000
    # A: 100 + 1280 + 49408 = 50788 > 90% of 50,000
    small = sizing.split(shape(), 64, 2, [Device("A", 50_000), Device("B", 150_000)], RAM)
    assert small.devices[0].total == 50_788 and small.devices[0].usable == 45_000
    assert not small.devices[0].fits and not small.fits
    assert small.worst.label == "A"


def test_split_boundaries_in_float32_as_llama_cpp() -> None:
    # 2^30 + 1 and 2^30 - 1 bytes: exactly, layer 2's 2/4 = 0.5 sits below A's share and would
    # go to A; in llama.cpp's float32 both sizes round to 2^30, the point is 0.5 itself, and
    # upper_bound sends layer 2 to B.
    sp = sizing.split(shape(), 64, 1, [Device("A", (1 << 30) + 1), Device("B", (1 << 30) - 1)],
                      RAM)
    assert [d.layers for d in sp.devices] == [(0, 1), (2, 3)]


def test_split_of_thirty_layers_over_two_equal_workers_as_llama_server_logs() -> None:
    # llama-server --rpc A,B with SmolLM2 (30 layers) and two equal CPU workers logs
    # RPC0 KV 96.00 MiB and RPC1 84.00 MiB at 8192 cells: 16 layers, then 14 and the output.
    sp = sizing.split(shape(30), 8192, 1, [Device("A", 24 * GiB), Device("B", 24 * GiB)], RAM)
    a, b = sp.devices
    assert a.layers == tuple(range(16)) and b.layers == (*range(16, 30), 30)
    assert (a.kv, b.kv) == (16 * 10 * 8192, 14 * 10 * 8192)


def test_split_keeps_the_first_layers_on_the_head_when_fewer_are_offloaded() -> None:
    # n_gpu_layers 2 of 3 + output: layer 0 stays on the head's CPU, 1..3 over the devices
    sp = sizing.split(shape(), 64, 2, [Device("A", 100_000)], RAM, offloaded=3)
    assert sp.devices[0].layers == (1, 2, 3) and sp.head.layers == (0,)
    assert (sp.head.weights, sp.head.kv) == (50 + 100, 10 * 128)
    # no device at all: everything on the head, the output (untied) too
    alone = sizing.split(shape(), 64, 2, [], RAM)
    assert alone.head.layers == (0, 1, 2, 3) and alone.head.weights == 50 + 600 + 40
    assert alone.offloaded == 0 and alone.devices == ()
    assert sp.offloaded == 3


def test_fit_cluster_trades_slots_then_context_then_refuses() -> None:
    s = dataclasses.replace(shape(), kv_layer_bytes=(1000,) * 3)
    # Free 1:1: points .5 and 1; layers 0, 1 (il/4 = 0, .25) on A; 2 and the output on B.
    even = [Device("A", 400_000), Device("B", 400_000)]  # 360,000 usable each
    # 4 slots of 64 tokens: compute 4 x 256 x 96 + 4 x 32 x 4 = 98,816; A holds
    # 100 + 200 + 2 x 1000 x 256 + 98,816 = 611,116. 2 slots: compute 4 x 128 x 96 + 256 =
    # 49,408; A 300 + 256,000 + 49,408 = 305,708, B 340 + 128,000 + 49,408 = 177,748.
    f = sizing.fit_cluster("m", s, sizing.Want(64, 4, -1), even, RAM)
    a, b = f.split.devices
    assert f.fits and (f.split.n_ctx, f.split.parallel) == (64, 2)
    assert (a.layers, b.layers) == ((0, 1), (2, 3))
    assert (a.total, b.total) == (305_708, 177_748)
    assert f.notes == ("parallel 4 -> 2: the KV cache of 4 slots would overflow A",)
    assert sizing.fit_cluster("m", s, sizing.Want(64, 2, -1), even, RAM).notes == ()

    # One slot of 1024 tokens: micro-batch 512, compute 4 x 512 x 96 + 128 = 196,736; A holds
    # 300 + 2 x 1000 x 1024 + 196,736 = 2,245,036; at 512 tokens 1,221,036.
    roomy = [Device("A", 1_400_000), Device("B", 1_400_000)]  # 1,260,000 usable each
    f = sizing.fit_cluster("m", s, sizing.Want(1024, 1, -1), roomy, RAM)
    assert f.fits and (f.split.n_ctx, f.split.parallel) == (512, 1)
    assert f.split.devices[0].total == 1_221_036
    assert f.notes == ("n_ctx 1024 -> 512: the KV cache for 1024 tokens per slot would "
                       "overflow A",)

    # Not even one slot of 512 tokens (the floor): the part that overflows most, in numbers.
    f = sizing.fit_cluster("m", s, sizing.Want(1024, 1, -1), [Device("A", 1_000)], RAM)
    assert not f.fits and (f.split.n_ctx, f.split.parallel) == (512, 1)
    assert f.split.worst.label == "A" and f.split.worst.total == 640 + 1_536_000 + 196_736
    assert sizing.cluster_refusal(f) == (
        "m does not fit over the cluster: with 1 slot(s) of 512 tokens, A (layers 0-2+out) "
        "needs 1.7 MiB (weights 640 B, KV cache 1.5 MiB, compute 192.1 KiB, runtime 0 B); "
        "900 B is usable (90% of 1000 B)")


# -- through the CLI -------------------------------------------------------------------------------
def configure(home: Path, workers: list[str], model: str = "") -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "sovctl.toml").write_text(
        f'[pull.smol]\nref = "{CHAT_MODEL}"\n'
        '[models.smol]\nrole = "chat"\nn_ctx = 2048\nparallel = 4\n'
        f"[cluster]\nworkers = {json.dumps(workers)}\n"
        + (f'model = "{model}"\n' if model else ""))


@pytest.fixture
def workers() -> Iterator[list[str]]:
    binary = shutil.which(cluster.RPC_WORKER, path=str(Path(sys.executable).parent))
    assert binary, "ggml-rpc-server is built by scripts/setup"
    ports = [free_port(), free_port()]
    procs = [subprocess.Popen([binary, "--port", str(p)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for p in ports]
    try:
        endpoints = [f"127.0.0.1:{p}" for p in ports]
        for e in endpoints:
            wait_for(lambda e=e: cluster.probe_worker(e, 2).ok, timeout=20, what=e)
        yield endpoints
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.slow
@pytest.mark.usefixtures("models")
def test_plan_splits_over_the_live_workers_and_names_the_dead_one(
        sovctl_home: Path, workers: list[str]) -> None:
    dead = f"127.0.0.1:{free_port()}"  # closed once free_port returns: refused
    configure(sovctl_home, [workers[0], dead, workers[1]])
    doc = run_json(sovctl_home, "plan", "smol", "--ram", "8GiB", "--vram", "0")
    assert doc["_rc"] == 0, doc["_stderr"]
    c = doc["data"]["cluster"]
    assert c["workers"] == [workers[0], dead, workers[1]]
    assert [h["endpoint"] for h in c["lost"]] == [dead] and c["lost"][0]["reason"]
    sp, shape_ = c["fit"]["split"], doc["data"]["fit"]["shape"]
    assert c["fit"]["fits"] and sp["fits"] and (sp["n_ctx"], sp["parallel"]) == (2048, 4)
    a, b = sp["devices"]
    assert (a["label"], b["label"]) == tuple(workers)
    # both report this machine's memory: about half the 31 layers each, in order
    assert a["layers"] + b["layers"] == list(range(31)) and abs(len(a["layers"]) - 16) <= 1
    assert b["output"] and not a["output"] and sp["head"]["layers"] == []
    # every byte of the model has a place; the tied head is a copy where the output goes
    weights = sum(d["weights"] for d in (a, b, sp["head"]))
    assert weights == shape_["weights_bytes"] + shape_["tied_bytes"]
    assert a["kv"] + b["kv"] == 2 * 30 * 3 * 64 * 2 * 2048 * 4
    for d in (a, b):
        assert 0 < d["usable"] < d["free"] and d["total"] == d["weights"] + d["kv"] + d["compute"]

    text = run(sovctl_home, "plan", "smol", "--ram", "8GiB", "--vram", "0")
    assert text.returncode == 0, text.stderr
    assert f"lost: {dead} (" in text.stdout and "fits: serve with n_ctx = 2048" in text.stdout
    assert workers[0] in text.stdout and workers[1] in text.stdout


@pytest.mark.usefixtures("models")
def test_worker_memory_trades_slots_context_and_refuses(cli, sovctl_home: Path) -> None:
    w = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]  # never asked: both given
    configure(sovctl_home, w)

    def plan(*args: str):
        return cli("--json", "plan", "smol", "--ram", "8GiB", "--vram", "0", *args)

    def memory(size: str) -> list[str]:
        return [x for e in w for x in ("--worker-memory", f"{e}={size}")]

    # 140 MiB each (126 usable): the second holds 14 layers and the tied output head, 58.3 MiB,
    # and at 4 x 2048 tokens 84 MiB of KV cache and 15.8 MiB of compute: 158.0 MiB (the first,
    # 16 layers: 145.6 MiB); with 2 slots 116.0 MiB.
    r = plan(*memory("140MiB"))
    assert r.exit_code == 0, r.stderr
    c = json.loads(r.stdout)["data"]["cluster"]
    assert c["lost"] == [] and [d["source"] for d in c["fit"]["split"]["devices"]] == \
        ["from --worker-memory"] * 2
    assert (c["fit"]["split"]["parallel"], c["fit"]["split"]["n_ctx"]) == (2, 2048)
    assert c["fit"]["notes"] == [f"parallel 4 -> 2: the KV cache of 4 slots would overflow "
                                 f"{w[1]}"]
    # one slot of 8192 tokens: 96 MiB of KV cache again; 4096 tokens fit
    r = plan(*memory("140MiB"), "--parallel", "1", "--ctx", "8192")
    split = json.loads(r.stdout)["data"]["cluster"]["fit"]["split"]
    assert r.exit_code == 0 and (split["parallel"], split["n_ctx"]) == (1, 4096)
    human = cli("plan", "smol", "--ram", "8GiB", "--vram", "0", "--parallel", "1", "--ctx",
                "8192", *memory("140MiB"))
    assert "note: n_ctx 8192 -> 4096" in human.stdout
    assert "fits: serve with n_ctx = 4096, parallel = 1" in human.stdout

    # 20 MiB: not even the first worker's weights fit
    r = plan(*memory("20MiB"))
    doc = json.loads(r.stdout)
    assert r.exit_code == ExitCode.FAILURE and doc["error"]["type"] == "DoesNotFit"
    assert doc["data"]["cluster"]["fit"]["fits"] is False
    msg = doc["error"]["message"]
    assert msg.startswith(f"smol does not fit over the cluster: with 1 slot(s) of 512 tokens, "
                          f"{w[1]} (layers 16-29+out) needs ")
    assert "is usable (90% of 20.0 MiB from --worker-memory)" in msg and "\n" not in msg
    human = cli("plan", "smol", "--ram", "8GiB", "--vram", "0", *memory("20MiB"))
    assert human.exit_code == ExitCode.FAILURE
    assert human.stderr.strip().count("\n") == 0 and "does not fit over the cluster" in human.stderr


@pytest.mark.usefixtures("models")
def test_worker_memory_is_checked_and_only_the_clustered_model_is_split(
        cli, sovctl_home: Path) -> None:
    w = f"127.0.0.1:{free_port()}"
    configure(sovctl_home, [w])
    for bad, what in ((f"{w}", "is not ENDPOINT=SIZE"), (f"{w}=lots", "as a size"),
                      ("127.0.0.1:1=1GiB", "not a [cluster] worker")):
        r = cli("plan", "smol", "--worker-memory", bad)
        assert r.exit_code == ExitCode.USAGE and what in r.stderr, r.stderr
    # [cluster] model names another model: smol is planned for this machine alone
    configure(sovctl_home, [w], model="other")
    r = cli("--json", "plan", "smol", "--ram", "8GiB")
    assert r.exit_code == 0 and json.loads(r.stdout)["data"]["cluster"] is None
    r = cli("plan", "smol", "--worker-memory", f"{w}=1GiB")
    assert r.exit_code == ExitCode.USAGE and "do not serve smol" in r.stderr
