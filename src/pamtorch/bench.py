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

import statistics
import time

import torch

__all__ = ["bench_matmul", "format_matmul_table", "packing_bytes", "bench_elementwise",
           "format_elementwise_table", "bench_step", "format_step_table"]


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

def bench_step(recipe: str = "translate", variants=("fp32", "pam-matmul", "pam-full", "paper"),
               reps: int = 10, threads=None, train_args=(), seed: int = 0) -> list:
    """Time one training step (forward, loss, backward, clipping, AdamW) of ``pamtorch train
    RECIPE``'s model under each arithmetic variant, as ``pamtorch train`` runs it.

    Every variant trains its own copy of the same initial model on the same batches; the
    variants take turns step by step (interleaved) and the median step time is reported, with
    "x fp32" = t_variant / t_fp32 (so 3.0 means three times as slow). ``train_args`` are
    extra ``pamtorch train`` options (e.g. ``--data-dir``, ``--preset``, ``--batch-size``)."""
    import argparse
    import copy

    from .recipes import train as T

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        p = argparse.ArgumentParser()
        T.add_arguments(p)
        args = p.parse_args([recipe, *train_args])
        mod = T.get_recipe(recipe)
        hp = T.resolve_hparams(args, mod)
        torch.manual_seed(seed)
        task = mod.Task(args, hp, None, torch.device("cpu"))
        runs = {}
        for v in variants:
            model = copy.deepcopy(task.model)
            opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay)
            runs[v] = (model, opt, T.arith_context(v))
        times = {v: [] for v in variants}
        for step in range(reps + 2):  # two warm-up steps
            batch = task.batch(step, hp.batch_size, seed)
            for v, (model, opt, ctx) in runs.items():
                torch.manual_seed(step)
                t0 = time.perf_counter()
                with ctx():
                    loss, _ = task.loss(model, batch)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), hp.clip or 1.0)
                    opt.step()
                if step >= 2:
                    times[v].append(time.perf_counter() - t0)
        base = statistics.median(times[variants[0]])
        return [{"recipe": recipe, "preset": hp.preset, "variant": v, "threads": torch.get_num_threads(),
                 "batch_size": hp.batch_size, "t_step_ms": statistics.median(times[v]) * 1e3,
                 "x_first": statistics.median(times[v]) / base} for v in variants]
    finally:
        torch.set_num_threads(old_threads)


def format_step_table(rows) -> str:
    """Markdown table of bench_step rows (ratios against the first variant, normally fp32)."""
    first = rows[0]["variant"] if rows else "fp32"
    lines = [f"| recipe | preset | batch | threads | variant | step ms (median) | x {first} |", "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['preset']} | {r['batch_size']} | {r['threads']} | {r['variant']} | "
                     f"{r['t_step_ms']:.1f} | {r['x_first']:.2f} |")
    return "\n".join(lines)
