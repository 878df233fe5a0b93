"""Prompt processing (pp) and token generation (tg) timed in-process with llama.cpp.

The method is llama-bench's (llama.cpp tools/llama-bench), so the figures can be compared:
- pp: clear the KV cache, decode `n_prompt` random tokens in batches of `n_batch` (the first
  is BOS where the vocabulary adds one), then synchronise; tokens/s = n_prompt / time.
- tg: clear the KV cache, decode `n_gen` tokens one at a time, synchronising after each;
  tokens/s = n_gen / time.
- each phase in its own context of n_prompt (pp) or n_gen (tg) tokens, as llama-bench makes
  one test per phase;
- a warm-up pp run and a one-token tg run first, then `reps` timed runs of each; the figure
  is the mean and sample standard deviation of the per-run tokens/s.

llama.cpp is driven through llama-cpp-python's low-level bindings so the model parameters
llama-bench exposes (GPU layers, weight repacking) can be set; nothing here prints.
"""

from __future__ import annotations

import ctypes
import logging
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovctl.bench.stats import mean, stdev
from sovctl.engines import DISTRIBUTION
from sovctl.errors import IntegrityError, RuntimeStartError, UsageError


@dataclass(frozen=True)
class MicroSettings:
    n_prompt: int
    n_gen: int
    reps: int
    threads: int
    n_gpu_layers: int
    batch: int
    ubatch: int
    flash_attn: bool
    repack: bool

    def key(self) -> dict[str, object]:
        """What makes two results comparable: everything except the number of repetitions."""
        return {k: v for k, v in self.__dict__.items() if k != "reps"}

    def check(self) -> None:
        if self.n_prompt < 0 or self.n_gen < 0 or self.n_prompt + self.n_gen == 0:
            raise UsageError("-p and -n must be >= 0 and not both 0",
                             hint="e.g. -p 512 -n 128 (llama-bench's defaults)")
        for label, value in (("-r/--repetitions", self.reps), ("-t/--threads", self.threads),
                             ("-b/--batch-size", self.batch), ("-ub/--ubatch-size", self.ubatch)):
            if value < 1:
                raise UsageError(f"{label} must be at least 1, got {value}")


@dataclass(frozen=True)
class ModelFacts:
    """What llama.cpp reports about the loaded weights."""

    bytes: int  # size of the weight tensors (llama_model_size); what tg reads per token
    parameters: int
    layers: int
    description: str


@dataclass(frozen=True)
class Timing:
    test: str  # "pp512" | "tg128", llama-bench's labels
    tokens: int  # per run
    seconds: tuple[float, ...]  # per timed run

    @property
    def samples_tps(self) -> tuple[float, ...]:
        return tuple(self.tokens / s for s in self.seconds)

    @property
    def tps_mean(self) -> float:
        return mean(self.samples_tps)

    @property
    def tps_sd(self) -> float:
        return stdev(self.samples_tps)


def quiet_llama(verbose: bool) -> None:
    """llama.cpp logs through llama-cpp-python's logger: errors only unless asked."""
    logging.getLogger(DISTRIBUTION).setLevel(logging.DEBUG if verbose else logging.CRITICAL)


class LoadedModel:
    """Weights loaded once per (GPU layers, repack); contexts are made per thread/batch setting."""

    def __init__(self, path: Path, n_gpu_layers: int, repack: bool) -> None:
        import llama_cpp

        self.ll = llama_cpp
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_extra_bufts = repack
        self.ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise IntegrityError(
                f"llama.cpp could not load {path.name}",
                hint="check the file with 'sovctl verify'; rerun with -v for llama.cpp's log",
            )
        vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.ptr, desc, ctypes.sizeof(desc))
        self.facts = ModelFacts(
            bytes=int(llama_cpp.llama_model_size(self.ptr)),
            parameters=int(llama_cpp.llama_model_n_params(self.ptr)),
            layers=int(llama_cpp.llama_model_n_layer(self.ptr)),
            description=desc.value.decode(errors="replace"),
        )

    def close(self) -> None:
        if self.ptr:
            self.ll.llama_model_free(self.ptr)
            self.ptr = None


class Context:
    """One llama.cpp context over a loaded model, holding n_ctx tokens."""

    def __init__(self, model: LoadedModel, s: MicroSettings, n_ctx: int) -> None:
        ll = model.ll
        self.ll, self.model, self.s = ll, model, s
        p = ll.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = s.batch
        p.n_ubatch = min(s.ubatch, s.batch)
        p.n_threads = s.threads
        p.n_threads_batch = s.threads
        p.flash_attn_type = (ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if s.flash_attn
                             else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        p.no_perf = True
        self.ptr = ll.llama_init_from_model(model.ptr, p)
        if not self.ptr:
            raise RuntimeStartError(
                "llama.cpp could not create a context "
                f"(n_ctx {p.n_ctx}, batch {s.batch}, GPU layers {s.n_gpu_layers})",
                hint="lower -b/--batch-size or -ngl/--gpu-layers; -v shows llama.cpp's log",
            )
        self.mem = ll.llama_get_memory(self.ptr)
        self.rng = random.Random(0)
        n = max(s.n_prompt, 1)
        self.tokens = (ll.llama_token * n)()
        self.one = (ll.llama_token * 1)()

    def close(self) -> None:
        if self.ptr:
            self.ll.llama_free(self.ptr)
            self.ptr = None

    def clear(self) -> None:
        self.ll.llama_memory_clear(self.mem, False)

    def _decode(self, batch: Any) -> None:
        rc = self.ll.llama_decode(self.ptr, batch)
        if rc != 0:
            self._failed(rc)

    def _failed(self, rc: int) -> None:
        raise RuntimeStartError(f"llama.cpp decode failed with code {rc}",
                                hint="a larger context or smaller batch may help")

    def _fill(self, n: int) -> None:
        m = self.model
        for i in range(n):
            self.tokens[i] = self.rng.randrange(m.n_vocab)
        if m.add_bos:
            self.tokens[0] = m.bos

    def prompt(self, n: int) -> float:
        """Seconds to process n prompt tokens from an empty cache."""
        ll = self.ll
        size = ctypes.sizeof(ll.llama_token)
        self._fill(n)
        base = ctypes.addressof(self.tokens)
        t0 = time.perf_counter_ns()
        done = 0
        while done < n:
            k = min(n - done, self.s.batch)
            ptr = ctypes.cast(base + done * size, ll.llama_token_p)
            self._decode(ll.llama_batch_get_one(ptr, k))
            done += k
        ll.llama_synchronize(self.ptr)
        return (time.perf_counter_ns() - t0) / 1e9

    def generate(self, n: int) -> float:
        """Seconds to generate n tokens one at a time from an empty cache.

        The loop is kept lean (one batch struct reused, tokens drawn beforehand) so Python
        adds as little as possible to llama.cpp's own time per token.
        """
        ll, m = self.ll, self.model
        one = self.one
        one[0] = m.bos if m.add_bos else self.rng.randrange(m.n_vocab)
        nxt = [self.rng.randrange(m.n_vocab) for _ in range(n)]
        batch = ll.llama_batch_get_one(one, 1)  # points at `one`, refilled in place
        decode, sync, ptr = ll.llama_decode, ll.llama_synchronize, self.ptr
        t0 = time.perf_counter_ns()
        for tok in nxt:
            rc = decode(ptr, batch)
            if rc != 0:
                self._failed(rc)
            sync(ptr)
            one[0] = tok
        return (time.perf_counter_ns() - t0) / 1e9




Measure = Callable[[str], AbstractContextManager[Any]]


def run_phases(model: LoadedModel, s: MicroSettings,
               measure: Measure) -> tuple[Timing | None, Timing | None]:
    """pp then tg, each in its own context sized as llama-bench sizes it (n_prompt or n_gen
    tokens): one warm-up run, then `reps` timed runs inside measure(test)."""
    pp = _phase(model, s, measure, "pp", s.n_prompt, Context.prompt, s.n_prompt) \
        if s.n_prompt else None
    tg = _phase(model, s, measure, "tg", s.n_gen, Context.generate, 1) if s.n_gen else None
    return pp, tg


def _phase(model: LoadedModel, s: MicroSettings, measure: Measure, kind: str, n: int,
           step: Callable[[Context, int], float], warm_up: int) -> Timing:
    """One test of n tokens: `step(ctx, warm_up)` once, then `reps` timed steps of n."""
    test = f"{kind}{n}"
    with closing(Context(model, s, n)) as ctx:
        ctx.clear()
        step(ctx, warm_up)
        with measure(test):
            secs = []
            for _ in range(s.reps):
                ctx.clear()
                secs.append(step(ctx, n))
    return Timing(test, n, tuple(secs))
