"""Timing of the compiled CPU kernels (PAM matrix products, PA elementwise ops) against torch.

``bench_matmul`` returns one row per size; ``format_matmul_table`` renders them as a
markdown table. Ratios are "x of torch.matmul" = t_torch / t_kernel on the same float32
operands with the same thread count (0.5 means half as fast as torch.matmul). Three forward
cases are timed because the kernel picks its inner loop from the operands: dense
(randn: no zeros, 2-op loop), ``a`` with ~50% zeros (ReLU output: 2-op loop with a
broadcast mask) and zeros in both operands (3-op loop). Timings
are interleaved (torch, forward, grad_a, grad_b, ... in every repetition) and the median
over repetitions is reported, which keeps a noisy shared machine from favouring one side.
"""
from __future__ import annotations

import contextlib
import importlib
import itertools
import statistics
import time

import torch

__all__ = ["machine", "bench_matmul", "format_matmul_table", "packing_bytes", "bench_elementwise",
           "format_elementwise_table", "bench_step", "format_step_table", "bench_step_memory",
           "format_memory_table", "bench_profile",
           "format_profile_table"]



def machine() -> str:
    """The CPU model, core count, torch version and thread count, for a benchmark's header."""
    import os
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")

def packing_bytes(M: int, K: int, N: int) -> dict:
    """Upper bounds of the extra (packing) memory of the compiled kernels, in bytes.

    forward: B strips (K x N padded to 16, int32 pattern + float sign/zero table) plus at
    most three int32 planes derived from A (only in the masked/general modes) and a
    contiguous copy of A when its rows are strided; exact grads: the exponent operand in
    strips (T x C padded), the other operand's mantissas (R x C padded) and a contiguous
    copy of dC (grad_b reads dC transposed)."""
    pad = lambda x, m: (x + m - 1) // m * m  # noqa: E731
    fwd = 8 * K * pad(N, 16) + 3 * 4 * M * K
    grad_a = 4 * N * pad(K, 16) + 4 * pad(M, 4) * pad(K, 16)
    grad_b = 4 * M * pad(K, 16) + 4 * pad(N, 4) * pad(K, 16) + 4 * M * N
    return {"fwd": fwd, "grad_a": grad_a, "grad_b": grad_b}


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_matmul(sizes=(512, 1024, 2048), reps: int = 5, threads=None, naive_max: int = 512,
                 seed: int = 0) -> list:
    """Time torch.matmul, pam_mm and the two exact gradients at square sizes.

    reps: repetitions per size (multiplied by up to 8 below n=1024), median reported.

    threads: torch.set_num_threads value for the run (default: leave as is).
    naive_max: largest size at which the pure-torch emulation (torch_fallback.pam_mm) is
    also timed (it is orders of magnitude slower; one repetition)."""
    from .kernels import cpu
    from .kernels import torch_fallback

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    rows = []
    try:
        backend = cpu.backend()
        g = torch.Generator().manual_seed(seed)
        for n in sizes:
            a = torch.randn(n, n, generator=g)
            b = torch.randn(n, n, generator=g)
            dc = torch.randn(n, n, generator=g)
            a_relu = torch.relu(a)  # ~50% zeros in a: masked kernel mode
            b_zero = torch.where(torch.rand(n, n, generator=g) < 0.1, torch.zeros(()), b)
            ops = {
                "torch": lambda: torch.matmul(a, b),
                "fwd": lambda: cpu.pam_mm(a, b),
                "fwd_relu": lambda: cpu.pam_mm(a_relu, b),
                "fwd_zeros": lambda: cpu.pam_mm(a_relu, b_zero),
                "grad_a": lambda: cpu.pam_mm_exact_grad_a(a, b, dc),
                "grad_b": lambda: cpu.pam_mm_exact_grad_b(a, b, dc),
            }
            for fn in ops.values():  # warm-up (and first-use build)
                fn()
            times = {k: [] for k in ops}
            # small sizes take few ms per call: more repetitions keep the median stable
            n_reps = max(1, reps) * max(1, min(8, (1024 // max(n, 1)) ** 2))
            for _ in range(n_reps):
                for k, fn in ops.items():
                    times[k].append(_time(fn))
            med = {k: statistics.median(v) for k, v in times.items()}
            naive = None
            if n <= naive_max:
                t_n = _time(lambda: torch_fallback.pam_mm(a, b))
                t_t = statistics.median([_time(ops["torch"]) for _ in range(3)])
                naive = t_t / t_n
            mem = packing_bytes(n, n, n)
            rows.append({
                "n": n,
                "threads": torch.get_num_threads(),
                "backend": backend,
                "t_torch_ms": med["torch"] * 1e3,
                "t_fwd_ms": med["fwd"] * 1e3,
                "t_grad_a_ms": med["grad_a"] * 1e3,
                "t_grad_b_ms": med["grad_b"] * 1e3,
                "fwd_ratio": med["torch"] / med["fwd"],
                "fwd_relu_ratio": med["torch"] / med["fwd_relu"],
                "fwd_zeros_ratio": med["torch"] / med["fwd_zeros"],
                "grad_a_ratio": med["torch"] / med["grad_a"],
                "grad_b_ratio": med["torch"] / med["grad_b"],
                "naive_ratio": naive,
                "extra_mib_fwd": mem["fwd"] / 2 ** 20,
                "extra_mib_grad": max(mem["grad_a"], mem["grad_b"]) / 2 ** 20,
                "operands_mib": 3 * 4 * n * n / 2 ** 20,
            })
    finally:
        torch.set_num_threads(old_threads)
    return rows


def format_matmul_table(rows) -> str:
    """Markdown table of bench_matmul rows."""
    head = ("| n | threads | backend | torch.matmul ms | pam_mm dense | pam_mm, a 50% zeros | "
            "pam_mm, zeros in a and b | exact grad_a | exact grad_b | pure-torch emulation | "
            "extra MiB fwd / grad |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        naive = f"{r['naive_ratio']:.4f}" if r.get("naive_ratio") is not None else "-"
        lines.append(
            f"| {r['n']} | {r['threads']} | {r['backend']} | {r['t_torch_ms']:.1f} | "
            f"{r['fwd_ratio']:.2f} | {r['fwd_relu_ratio']:.2f} | {r['fwd_zeros_ratio']:.2f} | "
            f"{r['grad_a_ratio']:.2f} | {r['grad_b_ratio']:.2f} | {naive} | "
            f"{r['extra_mib_fwd']:.0f} / {r['extra_mib_grad']:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# elementwise ops

ELEMENTWISE = (  # (name, PA op, torch op, arity)
    ("mul", "pam", torch.mul, 2),
    ("div", "pad", torch.div, 2),
    ("exp", "pa_exp", torch.exp, 1),
    ("log", "pa_log", torch.log, 1),
    ("rsqrt", "pa_rsqrt", torch.rsqrt, 1),
)


def bench_elementwise(sizes=(1 << 16, 1 << 20, 1 << 22), reps: int = 7, threads=None,
                      emulation_max: int = 1 << 20, seed: int = 0) -> list:
    """Time the float32 PA elementwise ops against their torch counterparts.

    One row per (op, size): the compiled kernel and, up to ``emulation_max`` elements, the
    pure-torch implementation (``arith._COMPILED = False``), each as "x of torch" =
    t_torch / t_pa. Binary ops are timed twice: two contiguous operands, and a contiguous
    [n/64, 64] operand against a broadcast [n/64, 1] column (a softmax's row sums)."""
    from . import arith

    old_threads, old_compiled = torch.get_num_threads(), arith._COMPILED
    if threads is not None:
        torch.set_num_threads(int(threads))
    rows = []
    try:
        g = torch.Generator().manual_seed(seed)
        for n in sizes:
            a = torch.randn(n, generator=g) * 4
            b = torch.randn(n, generator=g)
            pos = a.abs() + 0.1
            col = torch.randn(n // 64, 1, generator=g)
            for name, pa_name, tfn, arity in ELEMENTWISE:
                pa = getattr(arith, pa_name)
                cases = [("contiguous", (a, b) if arity == 2 else ((pos,) if name in ("log", "rsqrt") else (a,)))]
                if arity == 2:
                    cases.append(("row broadcast", (a.view(-1, 64), col)))
                for case, args in cases:
                    ops = {"torch": lambda: tfn(*args), "pa": lambda: pa(*args)}
                    arith._COMPILED = True
                    for fn in ops.values():
                        fn()
                    times = {k: [] for k in ops}
                    for _ in range(reps):
                        for k, fn in ops.items():
                            times[k].append(_time(fn))
                    med = {k: statistics.median(v) for k, v in times.items()}
                    emu = None
                    if n <= emulation_max:
                        arith._COMPILED = False
                        emu = med["torch"] / statistics.median([_time(ops["pa"]) for _ in range(3)])
                        arith._COMPILED = True
                    rows.append({"op": name, "case": case, "n": n, "threads": torch.get_num_threads(),
                                 "t_torch_ms": med["torch"] * 1e3, "t_pa_ms": med["pa"] * 1e3,
                                 "ratio": med["torch"] / med["pa"], "emulation_ratio": emu})
    finally:
        torch.set_num_threads(old_threads)
        arith._COMPILED = old_compiled
    return rows


def format_elementwise_table(rows) -> str:
    """Markdown table of bench_elementwise rows."""
    lines = ["| op | operands | elements | threads | torch ms | compiled PA, x of torch | "
             "pure-torch emulation, x of torch |", "|" + "---|" * 7]
    for r in rows:
        emu = f"{r['emulation_ratio']:.3f}" if r["emulation_ratio"] is not None else "-"
        lines.append(f"| {r['op']} | {r['case']} | {r['n']} | {r['threads']} | {r['t_torch_ms']:.2f} | "
                     f"{r['ratio']:.2f} | {emu} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# a whole training step of a recipe

STOCK_ENCODER = "encoder"


class _EncoderTask:
    """The stock model of the speed benchmarks: ``nn.Embedding`` -> ``nn.TransformerEncoder``
    (d 128, 4 heads, feed-forward 512, 2 post-norm layers, dropout 0.1) -> ``nn.Linear``,
    next-token style classification of a 16 x 64 batch of random tokens with cross entropy."""

    vocab, seq, d_model, layers = 1000, 64, 128, 2

    def __init__(self):
        layer = torch.nn.TransformerEncoderLayer(self.d_model, 4, 4 * self.d_model, dropout=0.1,
                                                 batch_first=True)
        self.model = torch.nn.Sequential(
            torch.nn.Embedding(self.vocab, self.d_model),
            torch.nn.TransformerEncoder(layer, self.layers, enable_nested_tensor=False),
            torch.nn.Linear(self.d_model, self.vocab))

    device = torch.device("cpu")

    def batch(self, step, batch_size, seed):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return torch.randint(0, self.vocab, (batch_size, self.seq + 1), generator=g).to(self.device)

    def loss(self, model, batch):
        logits = model(batch[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, self.vocab), batch[:, 1:].reshape(-1)), None


def _step_hparams(recipe: str, train_args):
    """(parsed train options or None, recipe module or None, settings) of a benchmark model,
    without building it: the checks of ``train_args`` and the preset, and the batch size."""
    import types

    from .recipes import train as T

    if recipe == STOCK_ENCODER:
        if train_args:
            raise T.UserError(f"--train-args: the stock {STOCK_ENCODER} model takes no pamtorch train "
                              f"options (got {' '.join(train_args)})")
        return None, None, types.SimpleNamespace(preset="stock", batch_size=16, lr=1e-3, betas=(0.9, 0.999),
                                                 weight_decay=0.01, clip=1.0)
    p = T.ArgumentParser(prog=f"pamtorch bench --train-args ({recipe})")
    T.add_arguments(p)
    args = p.parse_args([recipe, *train_args])
    mod = T.get_recipe(recipe)
    return args, mod, T.resolve_hparams(args, mod)


def _step_setup(recipe: str, train_args, seed: int, device="cpu"):
    """(task, settings) for one benchmark model on ``device`` (its batches are made there; the
    model is moved there by :func:`_copies`): a ``pamtorch train`` recipe with
    ``train_args``, or the stock encoder (:class:`_EncoderTask`, AdamW lr 1e-3, weight
    decay 0.01, clipping at 1)."""
    args, mod, hp = _step_hparams(recipe, train_args)
    torch.manual_seed(seed)
    device = torch.device(device)
    if mod is None:
        task = _EncoderTask()
        task.device = device
        return task, hp
    return mod.Task(args, hp, None, device), hp


def _train_step(task, hp, model, opt, batch):
    """Forward, loss, backward, gradient clipping and the optimizer step, as ``pamtorch
    train`` runs them."""
    loss, _ = task.loss(model, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), hp.clip or 1.0)
    opt.step()


def _copies(task, hp, n, device="cpu"):
    """``n`` copies of the task's model on ``device``, each with its own AdamW."""
    import copy

    out = []
    for _ in range(n):
        model = copy.deepcopy(task.model).to(device)
        out.append((model, torch.optim.AdamW(model.parameters(), lr=hp.lr, betas=hp.betas,
                                             weight_decay=hp.weight_decay)))
    return out


_STEP_DTYPES = ("bfloat16", "float16", "autocast")


def _check_variant(variant: str):
    """(arith, dtype) of a bench step variant ``ARITH[@DTYPE]``, or a :class:`UserError`
    that names the bad part."""
    from .recipes import train as T

    arith, _, dtype = variant.partition("@")
    T.arith_context(arith)  # an unknown arithmetic is one clear error
    if dtype and dtype not in _STEP_DTYPES:
        raise T.UserError(f"bench step: variant {variant!r}: the dtype after '@' must be bfloat16, "
                          f"float16 or autocast, got {dtype!r}")
    return arith, dtype


def _step_variant(variant: str, model, device_type: str = "cpu"):
    """The context factory of a bench step variant ``ARITH[@DTYPE]``: ``pamtorch train --arith
    ARITH``'s; with ``@bfloat16`` or ``@float16`` the model is cast to that dtype (its floating
    inputs too, by a forward pre-hook), with ``@autocast`` the step runs under autocast to
    bfloat16 (on ``device_type``, CPU or CUDA)."""
    from .recipes import train as T

    arith, dtype = _check_variant(variant)
    ctx = T.arith_context(arith)
    if not dtype:
        return ctx
    if dtype == "autocast":
        @contextlib.contextmanager
        def autocast():
            with ctx(), torch.autocast(device_type, dtype=torch.bfloat16):
                yield
        return autocast
    d = getattr(torch, dtype)
    model.to(d)  # in place: the optimizer keeps the same parameters
    model.register_forward_pre_hook(lambda m, args: tuple(
        a.to(d) if torch.is_tensor(a) and a.is_floating_point() else a for a in args))
    return ctx


def bench_step(recipe: str = "translate", variants=("fp32", "pam-matmul", "pam-full", "paper-exact-loss"),
               reps: int = 10, threads=None, train_args=(), seed: int = 0, device="cpu") -> list:
    """Time one training step (forward, loss, backward, clipping, AdamW) of ``pamtorch train
    RECIPE``'s model (or of the stock ``encoder``, :class:`_EncoderTask`) under each
    arithmetic variant, as ``pamtorch train`` runs it.

    Every variant trains its own copy of the same initial model on the same batches; the
    variants take turns step by step (interleaved) and the median step time is reported, with
    "x fp32" = t_variant / t_fp32 (so 3.0 means three times as slow). The median CPU time of
    the process per step (all its threads) is reported beside it: with one thread on a machine
    other jobs share, it is the step's time without the waits for the other jobs, the steadier
    of the two ratios there. ``train_args`` are
    extra ``pamtorch train`` options (e.g. ``--data-dir``, ``--preset``, ``--batch-size``).
    A variant ``ARITH@bfloat16`` (``@float16``, ``@autocast``) trains in that dtype
    (:func:`_step_variant`). On a ``device`` other than the CPU (``cuda``) the model and its
    batches live there and each timed step ends with a device synchronisation; the CPU-time
    columns then count the host's share only."""
    from .recipes.train import resolve_device

    device = resolve_device(str(device))  # pamtorch train --device's rules and errors
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        task, hp = _step_setup(recipe, train_args, seed, device)
        runs = {v: (m, o, _step_variant(v, m, device.type))
                for v, (m, o) in zip(variants, _copies(task, hp, len(variants), device))}
        times = {v: [] for v in variants}
        cpu = {v: [] for v in variants}  # this process's CPU time (all its threads)
        for step in range(reps + 2):  # two warm-up steps
            batch = task.batch(step, hp.batch_size, seed)
            for v, (model, opt, ctx) in runs.items():
                torch.manual_seed(step)
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                with ctx():
                    _train_step(task, hp, model, opt, batch)
                sync()
                if step >= 2:
                    times[v].append(time.perf_counter() - t0)
                    cpu[v].append(time.process_time() - c0)
        base, cbase = statistics.median(times[variants[0]]), statistics.median(cpu[variants[0]])
        return [{"recipe": recipe, "preset": hp.preset, "variant": v, "threads": torch.get_num_threads(),
                 "device": str(device),
                 "batch_size": hp.batch_size, "t_step_ms": statistics.median(times[v]) * 1e3,
                 "x_first": statistics.median(times[v]) / base, "cpu_step_ms": statistics.median(cpu[v]) * 1e3,
                 "x_first_cpu": statistics.median(cpu[v]) / cbase} for v in variants]
    finally:
        torch.set_num_threads(old_threads)


def format_step_table(rows) -> str:
    """Markdown table of bench_step rows (ratios against the first variant, normally fp32)."""
    first = rows[0]["variant"] if rows else "fp32"
    dev = any(r.get("device", "cpu") != "cpu" for r in rows)
    lines = [f"| recipe | preset | batch | {'device | ' if dev else ''}threads | variant | step ms (median) | x {first} "
             f"| CPU ms (median) | x {first} (CPU) |", "|" + "---|" * (10 if dev else 9)]
    for r in rows:
        where = f"{r.get('device', 'cpu')} | " if dev else ""
        lines.append(f"| {r['recipe']} | {r['preset']} | {r['batch_size']} | {where}{r['threads']} | {r['variant']} | "
                     f"{r['t_step_ms']:.1f} | {r['x_first']:.2f} | {r['cpu_step_ms']:.1f} | {r['x_first_cpu']:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# a training step's peak memory

_MiB = 2 ** 20


def _proc_status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: resident now, VmHWM: its high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _memory_child(recipe: str, variant: str, train_args, seed: int, steps: int, threads) -> dict:
    """One variant's memory, measured in a process of its own (see :func:`bench_step_memory`)."""
    import ctypes
    import gc
    import resource

    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    if threads is not None:
        torch.set_num_threads(int(threads))
    task, hp = _step_setup(recipe, train_args, seed)
    ((model, opt),) = _copies(task, hp, 1)
    ctx = _step_variant(variant, model)
    batches = [task.batch(i, hp.batch_size, seed) for i in range(steps + 1)]
    libc = ctypes.CDLL(None)

    def run(i):
        torch.manual_seed(i)
        with ctx():
            _train_step(task, hp, model, opt, batches[i])

    def fresh():
        """Back to the state after setup: no gradients, no optimizer state, freed heap returned."""
        opt.zero_grad(set_to_none=True)
        opt.state.clear()
        gc.collect()
        libc.malloc_trim(0)

    # a warm-up step: code pages, lazily built kernels and caches are one-time costs, not the step's
    run(steps)
    fresh()
    setup = _proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: VmHWM := VmRSS
    for i in range(steps):
        run(i)
    peak = _proc_status("VmHWM")
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the same steps again, every tensor allocation and free recorded; the saved-for-backward
    # tensors of the last forward (distinct storages, parameters left out: they are setup memory)
    fresh()
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            saved[st.data_ptr()] = (st.nbytes(), str(t.dtype).replace("torch.", ""))
        return t

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        for i in range(steps):
            saved.clear()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                run(i)
    # the CPU allocator's running total counts the blocks allocated while profiling, less those freed
    top, stack = None, list(p.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and (top is None or e.extra_fields.total_allocated
                                               > top.extra_fields.total_allocated):
            top = e
    where = top.parent
    while where is not None and where.parent is not None:
        where = where.parent
    by_dtype: dict = {}
    for nbytes, dtype in saved.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes / _MiB
    return {"recipe": recipe, "preset": hp.preset, "variant": variant, "threads": torch.get_num_threads(),
            "batch_size": hp.batch_size, "steps": steps, "setup_mib": setup / _MiB,
            "train_mib": (peak - setup) / _MiB, "process_peak_mib": process_peak / _MiB,
            "tensor_mib": top.extra_fields.total_allocated / _MiB,
            "tensor_peak_in": where.name if where is not None else "-",
            "params_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / _MiB,
            "saved_mib": by_dtype}


def bench_step_memory(recipe: str = "translate", variants=("fp32", "pam-matmul", "pam-full"), steps: int = 3,
                      threads=None, train_args=(), seed: int = 0) -> list:
    """Peak memory of the training step :func:`bench_step` times, for each arithmetic variant.

    Each variant runs in a fresh child process (so one variant's heap cannot serve another's
    peak): it builds the model and data, runs one warm-up step (code pages, lazily built
    kernels and caches are one-time costs), then drops the gradients and optimizer state and
    returns the freed heap to the OS (``malloc_trim``). Its resident set size then is the
    setup memory; the kernel's high-water mark is reset to it (``/proc/self/clear_refs``)
    and ``steps`` training steps run: training peak = VmHWM - setup, everything the steps
    add (gradients, AdamW state, activations saved for backward, temporaries, packing
    buffers, and allocator slack). The same steps are run again from the same state under
    torch.profiler: tensor peak = the largest total of live tensor bytes allocated during
    the steps (the CPU allocator's count; no allocator slack, no memory outside tensors),
    with the outermost op running at that moment; the tensors saved for backward by the
    last forward (distinct storages, not the parameters) are summed by dtype. What the
    training peak has beyond the tensor peak is mostly glibc's slack: its dynamic mmap
    threshold keeps large freed blocks on the heap, where fragmentation holds them (with
    ``MALLOC_MMAP_THRESHOLD_=65536`` the two peaks of vit and translate agree within 2 MiB). Ratios are
    against the first variant (normally fp32). The step's second forward runs with the
    first step's gradients alive (``pamtorch train`` frees them after the forward), so
    ``steps`` must be at least 2. Needs Linux (/proc) and glibc (``malloc_trim``)."""
    import ctypes
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from .recipes import train as T

    if steps < 2:
        raise T.UserError(f"--reps {steps}: the memory measurement needs at least 2 steps (the second "
                          f"forward runs with the first step's gradients alive)")
    if not os.path.exists("/proc/self/clear_refs") or not hasattr(ctypes.CDLL(None), "malloc_trim"):
        raise T.UserError("bench step --memory needs Linux (/proc/self/clear_refs) and glibc (malloc_trim)")
    if not variants:
        raise T.UserError("--variants: name at least one arithmetic variant (e.g. fp32,pam-full)")
    for v in variants:
        _check_variant(v)  # an unknown variant is one clear error here, not a child's traceback
    _step_hparams(recipe, train_args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            out = os.path.join(tmp, "row.json")
            spec = dict(recipe=recipe, variant=v, train_args=list(train_args), seed=seed, steps=steps,
                        threads=threads)
            code = ("import json, sys; from pamtorch.bench import _memory_child; "
                    "json.dump(_memory_child(**json.loads(sys.argv[1])), open(sys.argv[2], 'w'))")
            r = subprocess.run([sys.executable, "-c", code, json.dumps(spec), out], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"bench step --memory: the child process of {v} failed "
                                   f"(exit {r.returncode}):\n{r.stderr[-3000:]}")
            with open(out) as f:
                rows.append(json.load(f))
    for r in rows:
        r["x_first_train"] = r["train_mib"] / rows[0]["train_mib"]
        r["x_first_tensor"] = r["tensor_mib"] / rows[0]["tensor_mib"]
        r["x_first_process"] = r["process_peak_mib"] / rows[0]["process_peak_mib"]
    return rows


def format_memory_table(rows) -> str:
    """Markdown of bench_step_memory rows: a line on the method, then one row per variant."""
    first = rows[0]["variant"] if rows else "fp32"
    r0 = rows[0] if rows else {"steps": 0, "params_mib": 0.0}
    lines = [f"Each variant in a fresh process: setup = resident memory after building the model and data "
             f"and one warm-up step, its gradients and optimizer state dropped and the heap trimmed; "
             f"training peak = the kernel's high-water mark of resident memory over {r0['steps']} steps above "
             f"setup (gradients, AdamW state, activations, temporaries, allocator slack); tensor peak = the most "
             f"live tensor memory allocated during the same steps (torch.profiler, no slack), 'in' the outermost "
             f"op then; saved = tensors saved for backward by one forward, parameters left out; process peak = "
             f"ru_maxrss of the whole process (interpreter, libraries, data, warm-up). Parameters: "
             f"{r0['params_mib']:.1f} MiB.", "",
             f"| recipe | preset | batch | threads | variant | setup MiB | training peak MiB | x {first} | "
             f"tensor peak MiB | x {first} | tensor peak in | saved for backward MiB | process peak MiB | "
             f"x {first} |", "|" + "---|" * 14]
    for r in rows:
        saved = r["saved_mib"]
        other = ", ".join(f"{d} {m:.1f}" for d, m in sorted(saved.items()) if d != "float32" and m >= 0.05)
        saved_text = f"{sum(saved.values()):.1f}" + (f" ({other})" if other else "")
        lines.append(f"| {r['recipe']} | {r['preset']} | {r['batch_size']} | {r['threads']} | {r['variant']} | "
                     f"{r['setup_mib']:.0f} | {r['train_mib']:.1f} | {r['x_first_train']:.2f} | "
                     f"{r['tensor_mib']:.1f} | {r['x_first_tensor']:.2f} | {r['tensor_peak_in']} | {saved_text} | "
                     f"{r['process_peak_mib']:.0f} | {r['x_first_process']:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# where a step's time goes

PROFILE_KINDS = ("matmul", "softmax", "norm", "loss", "optimizer", "elementwise", "nonlinear")
# a group's parts: the compiled PA kernels; the rest of pamtorch's PA ops (their Python
# and the torch ops they run, which no mode sees); exact torch ops the mode ran as they
# are (pass-through ops, and ops of a kind the config leaves exact); the mode's handler
PROFILE_PARTS = ("kernel", "python", "torch op", "dispatch")
PROFILE_HEADS = ("PA kernels", "rest of the PA ops", "exact torch ops", "mode handler")
# torch.profiler's aten ops, by what they cost (the step-wide line under each table)
_ALLOCATION = frozenset(
    "empty empty_like empty_strided empty_permuted zeros zeros_like ones ones_like full full_like "
    "new_empty new_empty_strided new_zeros new_ones new_full scalar_tensor lift_fresh "
    "lift_fresh_copy resize_".split())
_CONVERSION = frozenset("_to_copy clone copy_".split())
# pamtorch.nn.functional's raw forward/backward functions (run by the function-level
# routes and their autograd backward), by op kind
_RAW_KINDS = (("log_softmax", "loss"), ("softmax", "softmax"), ("layer_norm", "norm"),
              ("rms_norm", "norm"), ("gelu", "nonlinear"), ("nll_loss", "loss"),
              ("mse_loss", "loss"), ("dropout", "elementwise"))


class _Profile:
    """Exclusive (self) wall time of nested regions, by (op kind, part).

    A region's kind is given or inherited from the enclosing region (None: outside any PA
    op). ``charge`` holds calibrated costs (see :func:`_calibrate`): what timing a region
    adds to its parent is booked as "instrumentation", not as the parent's time."""

    def __init__(self, charge=None):
        self.self_t: dict = {}
        self.calls: dict = {}
        self.stack: list = []
        self.charge = charge or {}
        self.instrumentation = 0.0

    def enter(self, kind, part):
        if kind is None and self.stack:
            kind = self.stack[-1][0]
        frame = [kind, part, 0.0, time.perf_counter()]
        self.stack.append(frame)
        return frame

    def leave(self, frame, charge=0.0):
        """End ``frame``; ``charge`` (the timer's own cost) is taken out of the parent's time."""
        dt = time.perf_counter() - frame[3]
        self.stack.pop()
        self.add(frame[0], frame[1], dt - frame[2])
        self.instrumentation += charge
        if self.stack:
            self.stack[-1][2] += dt + charge

    def add(self, kind, part, t):
        key = (kind, part)
        self.self_t[key] = self.self_t.get(key, 0.0) + t
        self.calls[key] = self.calls.get(key, 0) + 1

    def call(self, kind, part, fn, *args, **kwargs):
        frame = self.enter(kind, part)
        try:
            return fn(*args, **kwargs)
        finally:
            self.leave(frame, self.charge.get("call", 0.0))


def _profile_classes():
    """The timing modes, built on first use (pamtorch.mode imports the op table)."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    M = importlib.import_module("pamtorch.mode")  # the module (pamtorch.mode is also the function)

    class ProfiledPAMode(M.PAMode):
        """:class:`pamtorch.mode.PAMode` with its parts timed: the handler itself
        ("dispatch": classification, table lookup, config, recorder loop), pass-through ops,
        and each routed op's work. The same paths as PAMode's ``__torch_dispatch__``
        (``_facts``, ``_decide``, then ``_route``), the same results."""

        def __init__(self, config, prof):
            super().__init__(config)
            self.prof = prof

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            prof = self.prof
            frame = prof.enter(None, "dispatch")
            try:
                kwargs = kwargs or {}
                o = M._facts(func)
                d = M._FREE if o.free else M._decide(o, func, args, kwargs)
                if d is M._FREE:  # timed in place: a pass-through op is the most frequent call
                    t0 = time.perf_counter()
                    try:
                        return func(*args, **kwargs)
                    finally:
                        dt = time.perf_counter() - t0
                        frame[2] += dt
                        prof.add(frame[0], "torch op", dt)
                return self._route(o, func, d, args, kwargs)
            finally:
                prof.leave(frame, prof.charge.get("call", 0.0))

        def _work(self, kind, impl, func, args, kwargs, opcfg):
            prof = self.prof
            prof.stack[-1][0] = kind  # the handler's own time counts to this op's kind
            if impl is None:  # left exact by the config
                return prof.call(kind, "torch op", func, *args, **kwargs)
            return prof.call(kind, "python", impl, func, args, kwargs, opcfg)

    class OpTimer(TorchDispatchMode):
        """fp32: each aten op's time, by the kind the PA mode would give it."""

        def __init__(self, prof):
            super().__init__()
            self.prof, self.kinds = prof, M.PAMode()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t0 = time.perf_counter()
            kwargs = kwargs or {}
            kind = None
            if M.decide(func, args, kwargs).cls == "routable":
                kind = self.kinds.kind_config(M.op_kind(func))[0]
            prof = self.prof
            prof.instrumentation += time.perf_counter() - t0 + prof.charge.get("crossing", 0.0)
            return prof.call(kind, "torch op", func, *args, **kwargs)

    class NullDispatch(TorchDispatchMode):
        """Runs every aten op as is: what any Python dispatch mode costs."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class NullFunction(TorchFunctionMode):
        """Runs every torch function as is, counting them."""

        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    return ProfiledPAMode, OpTimer, NullDispatch, NullFunction


def _calibrate(n: int = 2000) -> dict:
    """Costs in seconds, medians of 5 rounds: what timing a Python call with
    ``_Profile.call`` adds to its parent ("call"), and what an aten op costs more under a
    pass-through Python dispatch mode ("crossing") or function mode ("function crossing")."""
    _, _, NullDispatch, NullFunction = _profile_classes()
    x = torch.zeros(1)
    noop = lambda: None  # noqa: E731
    out = {"call": [], "crossing": [], "function crossing": []}
    for _ in range(5):
        prof = _Profile()
        top = prof.enter("cal", "python")
        for _ in range(n):
            prof.call(None, "torch op", noop)
        prof.leave(top)
        out["call"].append(prof.self_t[("cal", "python")] / n)
        base = _time(lambda: [x.neg() for _ in range(n)])
        for key, null in (("crossing", NullDispatch()), ("function crossing", NullFunction())):
            with null:
                t = _time(lambda: [x.neg() for _ in range(n)])
            out[key].append(max(0.0, (t - base) / n))
    return {k: statistics.median(v) for k, v in out.items()}


def _install(prof, kernels_ext, raw_module):
    """Time the compiled kernels and pamtorch.nn.functional's raw forward/backward
    functions while ``prof`` profiles; returns what to restore."""
    saved = []
    if kernels_ext is not None:
        for name in dir(kernels_ext):
            if name.startswith(("ew_", "pam_")):
                fn = getattr(kernels_ext, name)
                default = "matmul" if name.startswith("pam_") else "elementwise"

                def kernel(*args, _fn=fn, _kind=default, **kwargs):
                    # a kernel outside any PA op (a function-level route's backward) counts by its own kind
                    return prof.call(None if prof.stack else _kind, "kernel", _fn, *args, **kwargs)
                saved.append((kernels_ext, name, fn))
                setattr(kernels_ext, name, kernel)
    for name in dir(raw_module):
        if name.endswith(("_forward", "_backward")):
            kind = next((k for prefix, k in _RAW_KINDS if name.startswith(prefix + "_")), None)
            if kind is not None:
                fn = getattr(raw_module, name)
                saved.append((raw_module, name, fn))
                setattr(raw_module, name, lambda *a, _fn=fn, _kind=kind, **k: prof.call(_kind, "python", _fn, *a, **k))
    return saved


def _restore(saved):
    for obj, name, fn in saved:
        setattr(obj, name, fn)


def _aten_costs(run) -> dict:
    """Self CPU time per step, in seconds, of the aten ops of ``run()`` (one step), as
    torch.profiler records them: "allocation", "conversion/copy" and "all" aten ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        run()
    out = {"allocation": 0.0, "conversion/copy": 0.0, "all": 0.0}
    for e in p.key_averages():
        if not e.key.startswith("aten::"):
            continue
        t = e.self_cpu_time_total / 1e6
        name = e.key[len("aten::"):]
        out["all"] += t
        if name in _ALLOCATION:
            out["allocation"] += t
        elif name in _CONVERSION:
            out["conversion/copy"] += t
    return out


def bench_profile(recipe: str = STOCK_ENCODER, variants=("pam-matmul", "pam-full"), reps: int = 5,
                  threads=None, train_args=(), seed: int = 0) -> list:
    """Where a training step's time goes, under each arithmetic ``variant`` against fp32.

    Each step (the one :func:`bench_step` times) runs in turn, interleaved: plain fp32;
    fp32 under a pass-through Python function mode and dispatch mode (what crossing into
    Python for every op costs); each variant as ``pamtorch train --arith`` runs it; then
    fp32 with each aten op timed, and each variant under a timing subclass of the mode.
    The timed PA step is split into exclusive (self) times by op kind (the config field
    that decides the op: matmul, softmax, norm, loss, optimizer, elementwise, nonlinear;
    pass-through ops outside any PA op on their own) and, within a kind, by part
    (:data:`PROFILE_PARTS`): the compiled PA kernels (their packing included), the rest of
    pamtorch's PA ops (Python, and the torch ops it runs: additions, sums, selects,
    conversions, allocations), exact torch ops the mode ran as they are, and the mode's
    handler (classification, table lookup, config, recorder loop). What is left of the
    step is the rest: the model's and autograd's own time and the crossings into the
    Python modes. The timers' calibrated cost is taken out.
    fp32's aten ops are grouped by the kind the mode would give them. After the timed
    steps, one step of each under torch.profiler gives the step-wide time of allocations
    and conversions/copies (inside the PA ops included).

    Returns one dict per variant (see :func:`format_profile_table`)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    from .config import Config
    from .kernels import cpu
    from .nn import functional as PF
    from .recipes import train as T

    M = importlib.import_module("pamtorch.mode")
    variants = tuple(v for v in variants if v != "fp32")  # fp32 is always the baseline
    if not variants:
        raise T.UserError("bench profile: name at least one variant besides fp32 (e.g. pam-full)")
    ProfiledPAMode, OpTimer, NullDispatch, NullFunction = _profile_classes()
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        task, hp = _step_setup(recipe, train_args, seed)
        charge = _calibrate()
        ext = cpu.load_extension()
        plain = ["fp32", "null", *variants]
        timed = ["fp32", *variants]
        models = dict(zip([("plain", v) for v in plain] + [("timed", v) for v in timed],
                          _copies(task, hp, len(plain) + len(timed))))
        profs = {v: _Profile(charge) for v in timed}
        nulls = (NullFunction(), NullDispatch())
        times = {k: [] for k in models}

        @contextlib.contextmanager
        def context(how, v):
            with T.arith_context("fp32" if how == "timed" or v == "null" else v)():
                if how == "plain" and v == "null":
                    with nulls[0], nulls[1]:
                        yield
                elif how == "timed" and v == "fp32":
                    hooks = [register_optimizer_step_pre_hook(M._opt_pre),
                             register_optimizer_step_post_hook(M._opt_post)]
                    try:
                        with OpTimer(profs[v]):
                            yield
                    finally:
                        for h in hooks:
                            h.remove()
                elif how == "timed":
                    saved = _install(profs[v], ext, PF)
                    try:
                        with M._entered(ProfiledPAMode(Config.from_name(v), profs[v])):
                            yield
                    finally:
                        _restore(saved)
                else:
                    yield

        def step(how, v, batch, i):
            model, opt = models[how, v]
            torch.manual_seed(i)
            with context(how, v):
                _train_step(task, hp, model, opt, batch)

        for i in range(reps + 2):  # two warm-up steps
            if i == 2:
                for prof in profs.values():
                    prof.__init__(charge)
                nulls[0].calls = 0
            batch = task.batch(i, hp.batch_size, seed)
            for how, v in models:
                t0 = time.perf_counter()
                step(how, v, batch, i)
                if i >= 2:
                    times[how, v].append(time.perf_counter() - t0)
        batch = task.batch(reps + 2, hp.batch_size, seed)
        costs = {v: _aten_costs(lambda v=v: step("plain", v, batch, reps + 2)) for v in ["fp32", *variants]}
        med = {k: statistics.median(t) for k, t in times.items()}
        fp32 = profs["fp32"]
        fp32_by_kind = {}
        for (kind, _), t in fp32.self_t.items():
            fp32_by_kind[kind] = fp32_by_kind.get(kind, 0.0) + t / reps
        fp32_ops = sum(fp32.calls.values()) / reps
        fp32_rest = (sum(times["timed", "fp32"]) - fp32.instrumentation) / reps - sum(fp32_by_kind.values())
        out = []
        for v in variants:
            prof = profs[v]
            total = (sum(times["timed", v]) - prof.instrumentation) / reps
            kinds = list(PROFILE_KINDS) + sorted({k for k, _ in prof.self_t if k not in PROFILE_KINDS
                                                  and k is not None}) + [None]
            groups = []
            for kind in kinds:
                parts = {p: prof.self_t.get((kind, p), 0.0) / reps for p in PROFILE_PARTS}
                if not any(parts.values()) and not fp32_by_kind.get(kind):
                    continue
                groups.append({"group": kind or "pass-through", "ops": prof.calls.get((kind, "dispatch"), 0) / reps,
                               "fp32_ms": fp32_by_kind.get(kind, 0.0) * 1e3,
                               "pa_ms": sum(parts.values()) * 1e3,
                               "parts_ms": {p: t * 1e3 for p, t in parts.items()}})
            rest = total - sum(g["pa_ms"] for g in groups) / 1e3
            groups.append({"group": "rest", "ops": None, "fp32_ms": fp32_rest * 1e3, "pa_ms": rest * 1e3,
                           "parts_ms": {}})
            out.append({"recipe": recipe, "preset": hp.preset, "variant": v, "threads": torch.get_num_threads(),
                        "batch_size": hp.batch_size, "t_fp32_ms": med["plain", "fp32"] * 1e3,
                        "t_null_ms": med["plain", "null"] * 1e3, "t_pa_ms": med["plain", v] * 1e3,
                        "x_fp32": med["plain", v] / med["plain", "fp32"], "t_profiled_ms": total * 1e3,
                        "fp32_ops": fp32_ops,
                        "pa_ops": sum(c for (_, p), c in prof.calls.items() if p == "dispatch") / reps,
                        "function_calls": nulls[0].calls / reps, "crossing_us": charge["crossing"] * 1e6,
                        "function_crossing_us": charge["function crossing"] * 1e6,
                        "aten_ms": {k: t * 1e3 for k, t in costs[v].items()},
                        "fp32_aten_ms": {k: t * 1e3 for k, t in costs["fp32"].items()},
                        "groups": groups})
        return out
    finally:
        torch.set_num_threads(old_threads)


def format_profile_table(results) -> str:
    """Markdown of bench_profile's results: per variant a line of step times, a table of
    groups (each with its share of the profiled PA step, split into its parts) and a line
    of the step-wide allocation and conversion time."""
    lines = ["Other jobs shared the machine while this ran: compare the ratios and shares, which "
             "come from one interleaved run, not the absolute times. Shares are of the profiled PA "
             "step (mean over the steps, the timers' calibrated cost taken out); a group's parts add "
             "up to its share. PA kernels include their packing; 'rest of the PA ops' is pamtorch's "
             "Python in the op implementations and the torch ops they run (no mode sees those); "
             "exact torch ops are the ones the mode ran as they are; the mode handler is its "
             "classification, table lookup, config and recorder loop. The crossings into the mode "
             "(ops/step x the calibrated cost of one) are an estimate inside the other columns: in PA "
             "kernels for the aten ops a compiled kernel runs, in rest for the others."]
    for r in results:
        a, f = r["aten_ms"], r["fp32_aten_ms"]
        lines += ["", f"**{r['recipe']} ({r['preset']}, batch {r['batch_size']}, {r['threads']} threads), "
                      f"{r['variant']}**: step {r['t_pa_ms']:.1f} ms = **{r['x_fp32']:.2f}x fp32** "
                      f"({r['t_fp32_ms']:.1f} ms); fp32 under pass-through Python modes {r['t_null_ms']:.1f} ms. "
                      f"{r['pa_ops']:.0f} aten ops reach the dispatch mode per PA step ({r['fp32_ops']:.0f} per "
                      f"fp32 step), each crossing into Python for about {r['crossing_us']:.1f} us; "
                      f"{r['function_calls']:.0f} torch function calls per step cross into the function mode for "
                      f"about {r['function_crossing_us']:.1f} us each. Profiled PA step {r['t_profiled_ms']:.1f} ms.",
                  "",
                  "| group | ops/step | fp32 ms | PA ms | x fp32 | % of PA step | " + " | ".join(PROFILE_HEADS) +
                  " | (crossings into the mode, est.) |",
                  "|" + "---|" * (7 + len(PROFILE_HEADS))]
        total = r["t_profiled_ms"]
        pct = lambda ms: f"{100 * ms / total:.1f}"  # noqa: E731
        for g in r["groups"]:
            x = f"{g['pa_ms'] / g['fp32_ms']:.2f}" if g["fp32_ms"] > 0.05 else "-"
            ops = "-" if g["ops"] is None else f"{g['ops']:.0f}"
            parts = [pct(g["parts_ms"][p]) if g["parts_ms"] else "" for p in PROFILE_PARTS]
            crossing = "" if g["ops"] is None else pct(g["ops"] * r["crossing_us"] / 1e3)
            lines.append(f"| {g['group']} | {ops} | {g['fp32_ms']:.1f} | {g['pa_ms']:.1f} | {x} | "
                         f"{pct(g['pa_ms'])} | " + " | ".join(parts) + f" | {crossing} |")
        lines += ["", f"Step-wide (torch.profiler, aten self time): allocation {a['allocation']:.1f} ms, "
                      f"conversion/copy {a['conversion/copy']:.1f} ms of {a['all']:.1f} ms in aten ops "
                      f"(fp32: {f['allocation']:.1f}, {f['conversion/copy']:.1f} of {f['all']:.1f} ms)."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# where a step's time goes on the kernel route

def _aten_kind(name: str, in_optimizer: bool) -> str:
    """The group of a profiled aten op: its op-table kind (an elementwise op inside an
    optimizer step is of the optimizer kind, as the mode decides), or "exact ops"."""
    from .ops import OP_TABLE

    packet = getattr(torch.ops.aten, name, None)
    entry = OP_TABLE.get(packet) if packet is not None else None
    if entry is None:
        return "optimizer (exact ops)" if in_optimizer else "exact ops"
    if in_optimizer and entry.kind == "elementwise":
        return "optimizer"
    return entry.kind


# pamtorch's autograd functions (the function-level routes of the mode: attention's
# products, softmax, norms, the loss...) as torch.profiler names them, by op kind; their
# backward nodes are "<name>Backward"
_FUNCTION_KINDS = {"_PamMM": "matmul", "_PamBMM": "matmul", "_Softmax": "softmax", "_LogSoftmax": "loss",
                   "_NLL": "loss", "_MSE": "loss", "_LayerNorm": "norm", "_RMSNorm": "norm", "_BatchNorm": "norm",
                   "_GroupNorm": "norm", "_Gelu": "nonlinear", "_PReLU": "nonlinear", "_Dropout": "elementwise",
                   "_Mul": "elementwise", "_Div": "elementwise", "_Unary": "elementwise",
                   "_Approx": "elementwise", "_RoundMantissa": "elementwise"}


def _event_group(name: str, in_optimizer: bool):
    """(group, name) of a profiled event that is not an aten op: a pamtorch autograd
    function by its kind, autograd's engine, the optimizer's own Python, or "other"."""
    base = name[:-len("Backward")] if name.endswith("Backward") else name
    if base in _FUNCTION_KINDS:
        return _FUNCTION_KINDS[base], name
    if name.startswith(("autograd::engine::", "torch::autograd::")) or name.endswith(("Backward0", "Backward1")):
        return "autograd engine", "autograd engine"
    if name.startswith(("Optimizer.step", "Optimizer.zero_grad")) or in_optimizer:
        return "optimizer (Python)", "Optimizer.step/zero_grad"
    return "other", name


def _profiled_ops(run, steps: int) -> tuple:
    """Run ``run()`` ``steps`` times under torch.profiler: (per (group, name) [calls, self
    seconds] per step, the profiled wall time per step). Aten ops count by their kind
    (:func:`_aten_kind`), other events by :func:`_event_group`."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(steps):
            run()
    wall = (time.perf_counter() - t0) / steps
    ops: dict = {}
    for e in p.events():
        parent, in_opt = e.cpu_parent, False
        while parent is not None:
            if parent.name.startswith("Optimizer.step"):
                in_opt = True
                break
            parent = parent.cpu_parent
        if e.name.startswith("aten::"):
            name = e.name[len("aten::"):]
            key = (_aten_kind(name, in_opt), name)
        else:
            key = _event_group(e.name, in_opt)
        c = ops.setdefault(key, [0.0, 0.0])
        c[0] += 1 / steps
        c[1] += e.self_cpu_time_total / 1e6 / steps
    return ops, wall


def _by_name(ops: dict) -> dict:
    """:func:`_profiled_ops`' table summed over groups: name -> [calls, seconds]."""
    out: dict = {}
    for (_, name), (c, t) in ops.items():
        a = out.setdefault(name, [0.0, 0.0])
        a[0] += c
        a[1] += t
    return out


def bench_profile_kernel(recipe: str = STOCK_ENCODER, variants=("pam-matmul", "pam-full"), reps: int = 5,
                         threads=None, train_args=(), seed: int = 0, top: int = 12) -> list:
    """Where a training step's time goes on the mode's kernel route (what ``pamtorch train``
    and ``pamtorch.mode`` run by default), under each arithmetic ``variant`` against fp32.

    The steps (the ones :func:`bench_step` times) run interleaved, fp32 and each variant on
    its own copy of the model, first plainly (the step times and ratios), then ``reps``
    steps of each under torch.profiler. Every aten op's self CPU time is grouped by the op
    kind the mode gives it (an elementwise op inside ``Optimizer.step`` is of the optimizer
    kind; ops outside the op table are "exact ops"). On the kernel route an op's self time
    holds its C++ answer and the compiled kernels it runs, or, for a call handed to Python,
    the Python handler less the aten ops that handler runs (those count on their own). The
    calls handed to Python are counted by wrapping the route's handler. pamtorch's autograd
    functions (the mode's function-level routes: attention's products, softmax, the loss,
    norms) count by their kind too, with the compiled kernels they call; autograd's engine
    nodes and the optimizer's own Python have groups of their own. "Outside any op" is the
    rest of the profiled step: the model's Python and the profiler's own cost.

    Returns one dict per variant (see :func:`format_profile_kernel_table`)."""
    from .recipes import train as T

    M = importlib.import_module("pamtorch.mode")
    from .config import Config

    variants = tuple(v for v in variants if v != "fp32")
    if not variants:
        raise T.UserError("bench profile: name at least one variant besides fp32 (e.g. pam-full)")
    for v in variants:
        if not M.kernel_route_applies(Config.from_name(_check_variant(v)[0])):
            raise T.UserError(f"bench profile --route kernel: {v} does not run on the kernel route here "
                              "(it needs the compiled CPU kernels, no CUDA/MPS device and no Python dispatch "
                              "mode); use --route dispatch")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    names = ("fp32", *variants)
    try:
        task, hp = _step_setup(recipe, train_args, seed)
        models = dict(zip(names, _copies(task, hp, len(names))))
        contexts = {v: _step_variant(v, models[v][0]) for v in names}
        seeds = itertools.count(reps + 3)   # a fresh seed for every profiled step

        def step(v, batch, i):
            model, opt = models[v]
            torch.manual_seed(i)
            with contexts[v]():
                _train_step(task, hp, model, opt, batch)

        times = {v: [] for v in names}
        for i in range(reps + 2):  # two warm-up steps
            batch = task.batch(i, hp.batch_size, seed)
            for v in names:
                t0 = time.perf_counter()
                step(v, batch, i)
                if i >= 2:
                    times[v].append(time.perf_counter() - t0)
        batch = task.batch(reps + 2, hp.batch_size, seed)

        python: dict = {}

        def timed_call(name, args, kwargs):
            t0 = time.perf_counter()
            try:
                return M._kernel_call(name, args, kwargs)
            finally:
                c = python.setdefault(name, [0, 0.0])
                c[0] += 1
                c[1] += time.perf_counter() - t0

        def run(v):
            step(v, batch, next(seeds))

        profiled = {}
        for v in names:
            python.clear()
            with M.kernel_route_handler(timed_call):
                ops, wall = _profiled_ops(lambda v=v: run(v), reps)
            profiled[v] = (ops, wall, {k: (c / reps, t / reps) for k, (c, t) in python.items()})
        med = {v: statistics.median(t) for v, t in times.items()}
        f_ops, f_wall, _ = profiled["fp32"]
        out = []
        for v in variants:
            ops, wall, py = profiled[v]
            groups: dict = {}

            def add(side, group, calls, ms):
                g = groups.setdefault(group, dict.fromkeys(("fp32_calls", "fp32_ms", "pa_calls", "pa_ms",
                                                            "python_calls", "python_ms"), 0.0))
                g[side + "_calls"] += calls
                g[side + "_ms"] += ms
            for side, table in (("fp32", f_ops), ("pa", ops)):
                for (group, _), (c, t) in table.items():
                    add(side, group, c, t * 1e3)
            for qual, (c, t) in py.items():
                add("python", _aten_kind(qual.split("::", 1)[1].split(".")[0], False), c, t * 1e3)
            f_total = sum(t for _, t in f_ops.values())
            p_total = sum(t for _, t in ops.values())
            rows = [dict(group=k, **g) for k, g in sorted(groups.items(), key=lambda kv: -kv[1]["pa_ms"])]
            rows.append({"group": "outside any op", "fp32_calls": None, "fp32_ms": (f_wall - f_total) * 1e3,
                         "pa_calls": None, "pa_ms": (wall - p_total) * 1e3, "python_calls": None, "python_ms": None})
            fp32_by_name, pa_by_name = _by_name(f_ops), _by_name(ops)
            excess = sorted(((pa_by_name.get(n, [0, 0])[1] - fp32_by_name.get(n, [0, 0])[1]) * 1e3, n)
                            for n in set(pa_by_name) | set(fp32_by_name))
            top_ops = [{"op": n, "excess_ms": x, "fp32_ms": fp32_by_name.get(n, [0, 0])[1] * 1e3,
                        "pa_ms": pa_by_name.get(n, [0, 0])[1] * 1e3, "fp32_calls": fp32_by_name.get(n, [0, 0])[0],
                        "pa_calls": pa_by_name.get(n, [0, 0])[0]} for x, n in reversed(excess[-top:])]
            out.append({"recipe": recipe, "preset": hp.preset, "variant": v, "threads": torch.get_num_threads(),
                        "batch_size": hp.batch_size, "t_fp32_ms": med["fp32"] * 1e3, "t_pa_ms": med[v] * 1e3,
                        "x_fp32": med[v] / med["fp32"], "profiled_fp32_ms": f_wall * 1e3,
                        "profiled_pa_ms": wall * 1e3, "groups": rows, "top_ops": top_ops,
                        "python_calls": sorted(((c, t * 1e3, q) for q, (c, t) in py.items()), reverse=True)})
        return out
    finally:
        torch.set_num_threads(old_threads)


def format_profile_kernel_table(results) -> str:
    """Markdown of bench_profile_kernel's results: per variant a line of step times, a table
    of op groups, the ops that cost most over fp32, and the calls handed to Python."""
    lines = ["Kernel route (what `pamtorch train` runs). Self CPU time under torch.profiler, per step "
             "(mean of the profiled steps), of aten ops grouped by the op kind the mode gives them, and of "
             "pamtorch's autograd functions (the mode's function-level routes, with the kernels they call) "
             "by theirs; 'calls' counts both. The profiler adds a few microseconds per op to both sides. "
             "'to Python' counts the calls the "
             "route hands to the Python handler and their time there (inclusive: the aten ops the handler "
             "runs are counted in their own groups too). Compare ratios: other jobs may share the machine."]
    for r in results:
        lines += ["", f"**{r['recipe']} ({r['preset']}, batch {r['batch_size']}, {r['threads']} threads), "
                      f"{r['variant']}**: step {r['t_pa_ms']:.1f} ms = **{r['x_fp32']:.2f}x fp32** "
                      f"({r['t_fp32_ms']:.1f} ms); profiled {r['profiled_pa_ms']:.1f} ms against "
                      f"{r['profiled_fp32_ms']:.1f} ms.",
                  "", "| group | fp32 calls | fp32 ms | PA calls | PA ms | x fp32 | % of PA step | "
                      "to Python: calls | ms |", "|" + "---|" * 9]
        total = r["profiled_pa_ms"]
        for g in r["groups"]:
            num = lambda x, f="{:.0f}": "-" if x is None else f.format(x)  # noqa: E731
            x = f"{g['pa_ms'] / g['fp32_ms']:.2f}" if g["fp32_ms"] > 0.05 else "-"
            lines.append(f"| {g['group']} | {num(g['fp32_calls'])} | {g['fp32_ms']:.1f} | {num(g['pa_calls'])} | "
                         f"{g['pa_ms']:.1f} | {x} | {100 * g['pa_ms'] / total:.1f} | {num(g['python_calls'])} | "
                         f"{num(g['python_ms'], '{:.1f}')} |")
        lines += ["", "Ops costing most over fp32 (self ms per step): " + "; ".join(
            f"{o['op']} +{o['excess_ms']:.1f} ({o['fp32_ms']:.1f} -> {o['pa_ms']:.1f}, "
            f"{o['fp32_calls']:.0f} -> {o['pa_calls']:.0f} calls)" for o in r["top_ops"] if o["excess_ms"] > 0.05) + "."]
        if r["python_calls"]:
            lines += ["", "Calls handed to Python per step: " + "; ".join(
                f"{q} {c:.0f} ({t:.1f} ms)" for c, t, q in r["python_calls"][:12]) + "."]
    return "\n".join(lines)
