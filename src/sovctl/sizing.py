"""How much memory a model needs, and the settings that fit this machine (`sovctl plan`).

The estimate, per runtime (one llama-server process per model), from the GGUF header alone:

- **weights**: the bytes of every tensor. Those of block N (`blk.N.*`) move to the GPU with
  layer N; the input embeddings always stay in RAM; the output head and final norm move to
  the GPU as the extra layer (llama.cpp's n_gpu_layers = n_layer + 1, "all"), a tied
  output head as a second copy of the token embeddings.
- **KV cache**: 2 (K and V) x n_layer x n_head_kv x head_dim x 2 bytes (f16, llama.cpp's default
  cache type) per token, for n_ctx x parallel tokens (llama-server gives each slot its own
  n_ctx); a layer's share sits where the layer runs. Encoder-only embedding models keep none.
- **compute buffers** (flash attention, llama-server's default): 4 bytes x n_ubatch (512) x
  (8 x n_embd + 2 x n_ff) for the activations of one micro-batch, plus 4 bytes x n_vocab per
  slot for the logits; an embedding model's batch is its whole context and also holds its
  attention scores (4 bytes x n_ctx^2 x n_head). On every device that holds layers.
- **overhead**: 128 MiB of RAM per runtime process; 512 MiB of VRAM per GPU runtime (CUDA
  context and cuBLAS workspace).

Against it, the memory there is: RAM available now (psutil) and free VRAM of the GPUs this
llama.cpp build can offload to (NVML), or what --ram / --vram say, less a 10% headroom.

The fit, in this order: every layer on the GPU with the asked slots and context (then fewer
slots, then a smaller context down to 2048 tokens); else as many layers on the GPU as fit, the
rest on the CPU, with the asked slots and context; else fewer slots, then a smaller context
(down to 512 tokens); else the model does not fit and the numbers say by how much.

A clustered runtime ([cluster] workers) is served with its layers offloaded, and llama.cpp splits
them over its devices (the RPC workers' first, in the order given, then the head's GPUs) in
proportion to the free memory each reports. Each device holds its layers' weights and KV cache,
a compute buffer, and a head GPU also the CUDA overhead; the head's RAM keeps the input
embeddings, a compute buffer and the runtime. The split never moves a layer to where it would
fit, so the fit trades slots, then context, until every part fits (`split`, `fit_cluster`).
"""

from __future__ import annotations

import bisect
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace

from sovctl.store.gguf_info import is_embedding
from sovctl.store.header import ModelHeader, Tensor
from sovctl.units import MiB, human_bytes

HEADROOM = 0.10
RAM_OVERHEAD = 128 * MiB
VRAM_OVERHEAD = 512 * MiB
N_UBATCH = 512
KV_BYTES = 2  # f16
MIN_CTX = 512
FULL_OFFLOAD_MIN_CTX = 2048

_INPUT = re.compile(r"^(token_embd|position_embd|token_types|token_embd_norm)\.")
_BLOCK = re.compile(r"^blk\.(\d+)\.")


# -- the model, as sizing sees it ----------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    label: str
    architecture: str
    file_size: int
    parameters: int
    weights_bytes: int
    n_layer: int
    layer_bytes: tuple[int, ...]  # blk.N
    input_bytes: int  # token embeddings and the like: always in RAM
    output_bytes: int  # head + final norm: on the GPU with the extra layer
    tied_bytes: int  # a head tied to the token embeddings: a copy of them on the GPU
    kv_layer_bytes: tuple[int, ...]  # K+V bytes per token, per layer
    n_embd: int
    n_head: int
    n_ff: int
    n_vocab: int
    context_length: int | None
    embedding: bool

    @property
    def kv_bytes_per_token(self) -> int:
        return sum(self.kv_layer_bytes)


def _int(value: object) -> int | None:
    """A scalar count from the metadata; None for an absent key or an array (`...`)."""
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _rows(t: Tensor | None) -> int:
    """A weight matrix's output width (GGUF lists the input width first)."""
    return 0 if t is None else t.dims[1] if len(t.dims) > 1 else t.dims[0]


def shape_of(h: ModelHeader) -> ModelShape:
    arch = str(h.get("general.architecture") or "unknown")

    def meta(key: str) -> object:
        return h.get(f"{arch}.{key}")

    by_name = {t.name: t for t in h.tensors}
    layer: list[int] = []
    input_bytes = output_bytes = 0
    has_output = False
    for t in h.tensors:
        if m := _BLOCK.match(t.name):
            i = int(m[1])
            if i >= len(layer):
                layer += [0] * (i + 1 - len(layer))
            layer[i] += t.n_bytes
        elif _INPUT.match(t.name):
            input_bytes += t.n_bytes
        else:
            has_output = has_output or t.name.startswith("output.")
            output_bytes += t.n_bytes
    n_layer = max(_int(meta("block_count")) or 0, len(layer))
    layer += [0] * (n_layer - len(layer))
    embedding = is_embedding(arch, h.metadata)
    token_embd = by_name.get("token_embd.weight")
    # A tied head reads the token embeddings: on the CPU the same bytes, on the GPU a copy.
    tied = token_embd.n_bytes if token_embd and not has_output and not embedding else 0

    n_embd = _int(meta("embedding_length")) or (token_embd.dims[0] if token_embd else 0)
    n_head = _int(meta("attention.head_count"))
    kv_meta = meta("attention.head_count_kv")
    if embedding:
        kv_layer: tuple[int, ...] = (0,) * n_layer  # an encoder keeps no KV cache
    elif n_head and kv_meta is not ...:
        # K+V per token: 2 x n_head_kv x head size x 2 bytes (no head_count_kv: plain MHA)
        n_kv = _int(kv_meta) if kv_meta is not None else n_head
        head_dim = n_embd // n_head
        k_len = _int(meta("attention.key_length")) or head_dim
        v_len = _int(meta("attention.value_length")) or head_dim
        kv_layer = (KV_BYTES * (n_kv or 0) * (k_len + v_len),) * n_layer
    else:
        # Per-layer head counts (an array): each layer's K and V projection widths instead;
        # a layer without attention (a hybrid model's recurrent one) keeps none.
        kv_layer = tuple(KV_BYTES * (_rows(by_name.get(f"blk.{i}.attn_k.weight"))
                                     + _rows(by_name.get(f"blk.{i}.attn_v.weight")))
                         for i in range(n_layer))
    n_ff = _int(meta("feed_forward_length")) or max(
        (_rows(t) for t in h.tensors if t.name.endswith(".ffn_up.weight")), default=4 * n_embd)
    vocab = _int(meta("vocab_size")) or (
        token_embd.dims[1] if token_embd and len(token_embd.dims) > 1 else 0)
    return ModelShape(
        label=h.source, architecture=arch, file_size=h.file_size,
        parameters=sum(t.n_elements for t in h.tensors),
        weights_bytes=sum(t.n_bytes for t in h.tensors), n_layer=n_layer,
        layer_bytes=tuple(layer), input_bytes=input_bytes, output_bytes=output_bytes,
        tied_bytes=tied, kv_layer_bytes=kv_layer, n_embd=n_embd,
        n_head=n_head or max(n_embd // 64, 1), n_ff=n_ff, n_vocab=vocab,
        context_length=_int(meta("context_length")), embedding=embedding,
    )


# -- the memory there is ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    ram_bytes: int  # RAM considered: available now, or --ram
    ram_source: str
    vram_bytes: int  # free VRAM over the GPUs llama.cpp can offload to, or --vram; 0 = none
    vram_source: str
    gpus: int  # GPUs holding that VRAM (each GPU runtime pays the CUDA overhead once)
    headroom: float = HEADROOM
    ram_used: int = 0  # by runtimes already planned on this budget
    vram_used: int = 0

    @property
    def ram_usable(self) -> int:
        return int(self.ram_bytes * (1 - self.headroom)) - self.ram_used

    @property
    def vram_usable(self) -> int:
        return int(self.vram_bytes * (1 - self.headroom)) - self.vram_used if self.gpus else 0

    def after(self, fp: Footprint) -> Budget:
        return replace(self, ram_used=self.ram_used + fp.ram_bytes,
                       vram_used=self.vram_used + fp.vram_bytes)


@dataclass(frozen=True)
class Footprint:
    offloaded: int  # layers on the GPU, 0..n_layer+1 (n_layer+1: the output layer too)
    n_ctx: int
    parallel: int
    weights_ram: int
    weights_vram: int
    kv_ram: int
    kv_vram: int
    compute_ram: int
    compute_vram: int
    overhead_ram: int
    overhead_vram: int

    @property
    def ram_bytes(self) -> int:
        return self.weights_ram + self.kv_ram + self.compute_ram + self.overhead_ram

    @property
    def vram_bytes(self) -> int:
        return self.weights_vram + self.kv_vram + self.compute_vram + self.overhead_vram


def _compute_bytes(s: ModelShape, n_ctx: int, parallel: int) -> int:
    if s.embedding:
        ub = n_ctx
        return 4 * ub * (8 * s.n_embd + 2 * s.n_ff) + 4 * ub * ub * s.n_head
    ub = min(N_UBATCH, n_ctx * parallel)
    return 4 * ub * (8 * s.n_embd + 2 * s.n_ff) + 4 * s.n_vocab * parallel


def footprint(s: ModelShape, n_ctx: int, parallel: int, offloaded: int) -> Footprint:
    """Memory of one runtime serving `s` with `parallel` slots of `n_ctx` tokens and the last
    `offloaded` layers on the GPU (as llama.cpp offloads: from the output end)."""
    offloaded = max(0, min(offloaded, s.n_layer + 1))
    gpu_layers = min(offloaded, s.n_layer)
    first_gpu = s.n_layer - gpu_layers
    tokens = 0 if s.embedding else n_ctx * parallel
    head_on_gpu = offloaded > s.n_layer
    w_gpu = sum(s.layer_bytes[first_gpu:]) + (s.output_bytes + s.tied_bytes if head_on_gpu
                                               else 0)
    w_cpu = s.input_bytes + sum(s.layer_bytes[:first_gpu]) + (0 if head_on_gpu
                                                              else s.output_bytes)
    kv_gpu = sum(s.kv_layer_bytes[first_gpu:]) * tokens
    compute = _compute_bytes(s, n_ctx, parallel)
    return Footprint(
        offloaded=offloaded, n_ctx=n_ctx, parallel=parallel,
        weights_ram=w_cpu, weights_vram=w_gpu,
        kv_ram=s.kv_bytes_per_token * tokens - kv_gpu, kv_vram=kv_gpu,
        compute_ram=compute if offloaded <= s.n_layer else 0,
        compute_vram=compute if offloaded else 0,
        overhead_ram=RAM_OVERHEAD, overhead_vram=VRAM_OVERHEAD if offloaded else 0,
    )


def runtime_need(s: ModelShape, n_ctx: int, parallel: int, n_gpu_layers: int, gpus: bool,
                 projector: int = 0) -> tuple[int, int]:
    """(RAM, VRAM) bytes one runtime serving `s` as configured holds: the footprint, with as
    many layers offloaded as n_gpu_layers asks where there is a GPU (-1: all of them), plus a
    multimodal projector's weights where the model's layers go. The supervisor admits a
    runtime loaded on demand by this estimate."""
    offloaded = 0
    if gpus and n_gpu_layers:
        offloaded = s.n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers
    fp = footprint(s, n_ctx, parallel, offloaded)
    if fp.offloaded:
        return fp.ram_bytes, fp.vram_bytes + projector
    return fp.ram_bytes + projector, fp.vram_bytes


def _fits(fp: Footprint, b: Budget) -> bool:
    return fp.ram_bytes <= b.ram_usable and fp.vram_bytes <= max(b.vram_usable, 0)


# -- the fit ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Want:
    n_ctx: int
    parallel: int
    n_gpu_layers: int  # -1: as many as fit; 0: CPU only; k: at most k


@dataclass(frozen=True)
class Fit:
    model: str
    role: str
    fits: bool
    n_ctx: int
    parallel: int
    n_gpu_layers: int  # the setting to serve with: -1 = all (output layer too), else a count
    offloaded_layers: int
    n_layer: int
    footprint: Footprint
    want: Want
    ram_usable: int  # what this model could use, after the models planned before it
    vram_usable: int
    notes: tuple[str, ...]
    shape: ModelShape

    @property
    def where(self) -> str:
        if self.offloaded_layers == 0:
            return "CPU"
        if self.offloaded_layers > self.n_layer:
            return "GPU"
        return f"GPU {self.offloaded_layers}/{self.n_layer + 1} layers, rest CPU"


def _halvings(start: int, floor: int) -> list[int]:
    out = [start]
    while out[-1] // 2 >= floor:
        out.append(out[-1] // 2)
    return out


def _trained_ctx(name: str, s: ModelShape, n_ctx: int) -> tuple[int, list[str]]:
    """The context asked, capped at what the model was trained on (and a note saying so)."""
    if s.context_length and n_ctx > s.context_length:
        return s.context_length, [f"n_ctx {n_ctx} is past what {name} was trained on; capped "
                                  f"at {s.context_length}"]
    return n_ctx, []


def fit(name: str, role: str, s: ModelShape, want: Want, budget: Budget) -> Fit:
    n_ctx, notes = _trained_ctx(name, s, want.n_ctx)
    parallel = max(want.parallel, 1)
    ctx_steps = _halvings(n_ctx, min(MIN_CTX, n_ctx))
    par_steps = _halvings(parallel, 1)
    top = s.n_layer + 1 if want.n_gpu_layers < 0 else min(want.n_gpu_layers, s.n_layer + 1)
    if budget.vram_usable <= 0:
        if want.n_gpu_layers != 0:
            notes.append(f"no GPU to offload to ({budget.vram_source}): every layer on the CPU")
        top = 0

    def result(fp: Footprint, ok: bool) -> Fit:
        all_layers = fp.offloaded > s.n_layer
        extra = list(notes)
        if ok:
            if fp.parallel < parallel:
                extra.append(f"parallel {parallel} -> {fp.parallel}: each slot's KV cache "
                             f"({human_bytes(s.kv_bytes_per_token * fp.n_ctx)}) would not fit")
            if fp.n_ctx < n_ctx:
                extra.append(f"n_ctx {n_ctx} -> {fp.n_ctx}: the KV cache for {n_ctx} tokens "
                             "per slot would not fit")
            if 0 < fp.offloaded <= s.n_layer and top > 0:
                extra.append(f"partial offload: {fp.offloaded} of {s.n_layer + 1} layers on "
                             "the GPU, the rest on the CPU (slower than all on the GPU)")
            elif fp.offloaded == 0 and top > 0:
                extra.append("the GPU cannot hold even one layer: every layer on the CPU")
        return Fit(
            model=name, role=role, fits=ok, n_ctx=fp.n_ctx, parallel=fp.parallel,
            n_gpu_layers=-1 if all_layers else fp.offloaded, offloaded_layers=fp.offloaded,
            n_layer=s.n_layer, footprint=fp, want=want, ram_usable=budget.ram_usable,
            vram_usable=max(budget.vram_usable, 0), notes=tuple(extra), shape=s,
        )

    if top > s.n_layer:  # every layer on the GPU, trading slots and then context for it
        for ctx in ctx_steps:
            if ctx < min(n_ctx, FULL_OFFLOAD_MIN_CTX):
                break
            for par in par_steps:
                fp = footprint(s, ctx, par, top)
                if _fits(fp, budget):
                    return result(fp, True)
    for ctx in ctx_steps:
        for par in par_steps:
            for layers in range(top, -1, -1):
                fp = footprint(s, ctx, par, layers)
                if _fits(fp, budget):
                    return result(fp, True)
    return result(footprint(s, ctx_steps[-1], 1, 0), False)


def refusal(f: Fit, budget: Budget) -> str:
    """The numbers of a model that does not fit, in one sentence."""
    fp = f.footprint
    share = f"{100 - round(budget.headroom * 100)}%"
    text = (f"{f.model} does not fit: on the CPU with 1 slot of {fp.n_ctx} tokens it needs "
            f"{human_bytes(fp.ram_bytes)} of RAM (weights {human_bytes(fp.weights_ram)}, KV cache "
            f"{human_bytes(fp.kv_ram)}, compute {human_bytes(fp.compute_ram)}, runtime "
            f"{human_bytes(fp.overhead_ram)}); {human_bytes(max(f.ram_usable, 0))} is usable "
            f"({share} of "
            f"{human_bytes(budget.ram_bytes)} {budget.ram_source}"
            + (f", less {human_bytes(budget.ram_used)} for the models before it)"
               if budget.ram_used else ")"))
    if budget.vram_usable > 0:
        gpu = footprint(f.shape, fp.n_ctx, 1, f.n_layer + 1)
        text += (f"; with every layer on the GPU it needs {human_bytes(gpu.vram_bytes)} of VRAM, "
                 "and "
                 f"{human_bytes(budget.vram_usable)} is usable ({share} of "
                 f"{human_bytes(budget.vram_bytes)} {budget.vram_source})")
    return text


def fit_all(models: Sequence[tuple[str, str, ModelShape, Want]], budget: Budget
            ) -> tuple[list[Fit], Budget]:
    """Fit several runtimes on one machine: embedding models first (small, fixed), then the
    rest, each on what the ones before it left."""
    order = sorted(models, key=lambda m: m[1] != "embedding")
    fits = []
    for name, role, shape, want in order:
        f = fit(name, role, shape, want, budget)
        fits.append(f)
        if f.fits:
            budget = budget.after(f.footprint)
    by_name = {f.model: f for f in fits}
    return [by_name[m[0]] for m in models], budget


# -- a cluster: one runtime's layers over RPC workers and the head's GPUs -------------------------
@dataclass(frozen=True)
class Device:
    """A device llama.cpp can put layers on: a worker's (over RPC) or one of the head's GPUs."""
    label: str
    free: int
    overhead: int = 0  # what the runtime takes there once it holds a layer (a head GPU's CUDA)
    source: str = ""  # where `free` comes from, as it reads after the size


@dataclass(frozen=True)
class DeviceShare:
    """What one device holds of a clustered runtime; the head's RAM is one too."""
    label: str
    source: str
    free: int
    usable: int
    layers: tuple[int, ...]  # layer indices; n_layer is the output layer
    output: bool
    weights: int
    kv: int
    compute: int
    overhead: int
    total: int
    fits: bool


@dataclass(frozen=True)
class Split:
    n_ctx: int
    parallel: int
    n_layer: int
    offloaded: int  # layers on the devices, 0..n_layer+1
    devices: tuple[DeviceShare, ...]  # in llama.cpp's order: the workers', then the head's GPUs
    head: DeviceShare  # the head's RAM: input embeddings, layers left on its CPU, runtime
    fits: bool

    @property
    def worst(self) -> DeviceShare:
        """The part that overflows most (when all fit: the one with the least room left)."""
        return max((*self.devices, self.head), key=lambda d: d.total - d.usable)


def _f32(x: float) -> float:
    return float(struct.unpack("f", struct.pack("f", x))[0])


def _layer_devices(devices: Sequence[Device], n_layer: int, offloaded: int) -> list[int | None]:
    """The device index of each layer 0..n_layer (n_layer: the output layer), None for the
    head's CPU. llama.cpp's default split: each device takes layers in proportion to its free
    memory, computed in float32 so that a layer on a boundary lands where llama.cpp puts it."""
    sums, acc = [], 0.0
    for d in devices:
        acc = _f32(acc + _f32(d.free))
        sums.append(acc)
    if acc == 0:  # nothing free anywhere (or no device): llama.cpp would divide by zero
        return [None] * (n_layer + 1)
    points = [_f32(x / acc) for x in sums]
    start = n_layer + 1 - offloaded
    return [None if il < start else bisect.bisect_right(points, _f32((il - start) / offloaded))
            for il in range(n_layer + 1)]


def split(s: ModelShape, n_ctx: int, parallel: int, devices: Sequence[Device], head: Budget,
          offloaded: int | None = None) -> Split:
    """Where llama.cpp puts a runtime serving `s` with `parallel` slots of `n_ctx` tokens and
    its last `offloaded` layers (default: all, the output layer too) over `devices`, given in
    its order, and what each part then holds against its free memory less the headroom."""
    offloaded = s.n_layer + 1 if offloaded is None else max(0, min(offloaded, s.n_layer + 1))
    where = _layer_devices(devices, s.n_layer, offloaded)
    tokens = 0 if s.embedding else n_ctx * parallel
    compute = _compute_bytes(s, n_ctx, parallel)

    def parts(layers: list[int], tied: int) -> tuple[int, int]:
        blocks = [i for i in layers if i < s.n_layer]
        head_bytes = s.output_bytes + tied if s.n_layer in layers else 0
        return (sum(s.layer_bytes[i] for i in blocks) + head_bytes,
                sum(s.kv_layer_bytes[i] for i in blocks) * tokens)

    shares = []
    for i, d in enumerate(devices):
        layers = [il for il, at in enumerate(where) if at == i]
        need = (*parts(layers, s.tied_bytes), compute if layers else 0,
                d.overhead if layers else 0)
        usable = int(d.free * (1 - head.headroom))
        shares.append(DeviceShare(d.label, d.source, d.free, usable, tuple(layers),
                                  s.n_layer in layers, *need, sum(need), sum(need) <= usable))
    # The head's CPU always runs the input layer, so it always has a compute buffer too; a
    # tied output head left there reads the token embeddings, not a copy of them.
    cpu = [il for il, at in enumerate(where) if at is None]
    weights, kv = parts(cpu, 0)
    own = (s.input_bytes + weights, kv, compute, RAM_OVERHEAD)
    head_share = DeviceShare("head RAM", head.ram_source, head.ram_bytes, head.ram_usable,
                             tuple(cpu), s.n_layer in cpu, *own, sum(own),
                             sum(own) <= head.ram_usable)
    return Split(n_ctx, parallel, s.n_layer, len(where) - len(cpu), tuple(shares), head_share,
                 head_share.fits and all(d.fits for d in shares))


@dataclass(frozen=True)
class ClusterFit:
    model: str
    fits: bool
    want: Want
    split: Split  # the one to serve with; not fitting: the smallest setting tried
    notes: tuple[str, ...]


def fit_cluster(name: str, s: ModelShape, want: Want, devices: Sequence[Device], head: Budget
                ) -> ClusterFit:
    """The asked slots and context over `devices`; where a part overflows, fewer slots, then a
    smaller context (halving, down to 512 tokens), as `fit` trades them. The layers never
    move: llama.cpp splits them by free memory, not by what each device would need."""
    n_ctx, notes = _trained_ctx(name, s, want.n_ctx)
    parallel = max(want.parallel, 1)
    # serve offloads every layer of a clustered model left at 0: none would reach a worker
    offloaded = None if want.n_gpu_layers <= 0 else want.n_gpu_layers

    def at(ctx: int, par: int) -> Split:
        return split(s, ctx, par, devices, head, offloaded)

    for ctx in _halvings(n_ctx, min(MIN_CTX, n_ctx)):
        for par in _halvings(parallel, 1):
            sp = at(ctx, par)
            if sp.fits:
                if par < parallel:
                    notes.append(f"parallel {parallel} -> {par}: the KV cache of {parallel} "
                                 f"slots would overflow {at(ctx, parallel).worst.label}")
                if ctx < n_ctx:
                    notes.append(f"n_ctx {n_ctx} -> {ctx}: the KV cache for {n_ctx} tokens per "
                                 f"slot would overflow {at(n_ctx, par).worst.label}")
                return ClusterFit(name, True, want, sp, tuple(notes))
    return ClusterFit(name, False, want, sp, tuple(notes))


def layer_range(layers: Sequence[int], n_layer: int) -> str:
    """"0-15", "16-29+out" (the output layer), "out", "-" for none: a device's layers are
    consecutive."""
    blocks = [i for i in layers if i < n_layer]
    text = "" if not blocks else str(blocks[0]) if len(blocks) == 1 else \
        f"{blocks[0]}-{blocks[-1]}"
    return "+".join(x for x in (text, "out" if n_layer in layers else "") if x) or "-"


def cluster_refusal(f: ClusterFit, headroom: float = HEADROOM) -> str:
    """The numbers of the part of a cluster that overflows most, in one sentence."""
    sp = f.split
    d = sp.worst
    holds = f"layers {layer_range(d.layers, sp.n_layer)}"
    if d is sp.head:
        holds = "the input layer" + (f", {holds}" if d.layers else "")
    return (f"{f.model} does not fit over the cluster: with {sp.parallel} slot(s) of "
            f"{sp.n_ctx} tokens, {d.label} ({holds}) needs {human_bytes(d.total)} (weights "
            f"{human_bytes(d.weights)}, KV cache {human_bytes(d.kv)}, compute "
            f"{human_bytes(d.compute)}, runtime {human_bytes(d.overhead)}); "
            f"{human_bytes(max(d.usable, 0))} is usable ({100 - round(headroom * 100)}% of "
            f"{' '.join(x for x in (human_bytes(d.free), d.source) if x)})")
