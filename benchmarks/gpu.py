"""Check pamtorch on a CUDA device, then time its matrix products against cuBLAS fp32 and
its whole training step against fp32.

    python benchmarks/gpu.py                     # checks + matmul sizes 1024 2048 4096 8192 + steps
    python benchmarks/gpu.py --sizes 1024 2048   # fewer sizes
    python benchmarks/gpu.py --check-only
    python benchmarks/gpu.py --skip-matmul --step-recipes encoder   # one step table only

1. Correctness: on a few odd shapes (including transposed views and inf/NaN/zero/subnormal
   entries) the Triton forward, approx backward (forward kernel on transposed views) and
   exact backward kernels are compared with the float64 reference of tests/pam_checks.py
   (the same rule the test suite applies) and the CPU backend of ``pamtorch.kernels``
   (C++ kernel or pure-torch fallback) is held to the same reference on the same inputs.
2. Timing (``triton.testing.do_bench``, median ms): for square n x n float32 operands,
   forward ``A @ B``, approx backward (``dC @ B^T`` and ``A^T @ dC``) and exact backward
   (both exact-gradient kernels) against cuBLAS with TF32 off (two matmuls for each
   backward). Printed as a markdown table; "x of torch.matmul" = t_torch / t_pam.
3. A training step on the GPU (step checks): the stock encoder of ``pamtorch bench step`` in
   eval mode (no dropout) under ``pam-full``, forward and backward on CUDA against the same
   on the CPU: the loss must agree to 1e-4 relative and every gradient to 1e-2 relative in
   norm (the matrix products sum in another order, and a PA op's result can move by one
   piece when an input moves by an ulp).
4. Training steps (``pamtorch bench step --device cuda``): fp32, pam-matmul and pam-full for
   each of ``--step-recipes``, interleaved, median step time (ratio "x fp32" = t_variant /
   t_fp32, so 3.0 means three times as slow); ``--data-dir`` gives translate the
   German-English corpus (its ``small`` preset), else its built-in toy data.

Exits with status 1 and a message when no CUDA device is present or a check fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "tests"))  # pam_checks, reference
sys.path.insert(0, os.path.join(_ROOT, "src"))

import torch  # noqa: E402

CHECK_SHAPES = [(1, 1, 1), (37, 53, 29), (128, 96, 160), (257, 129, 65)]


def _inputs(M, K, N, seed, specials):
    import pam_checks as pc
    g = torch.Generator().manual_seed(seed)
    make = pc.sparse_specials if specials else (lambda s, gen: torch.randn(s, generator=gen))
    return make((M, K), g), make((K, N), g), torch.randn(M, N, generator=g)


def run_checks(verbose=True) -> bool:
    import pam_checks as pc
    from pamtorch import kernels
    from pamtorch.kernels.triton import matmul as tk

    cpu_name = kernels.backend_name("cpu")
    ok = True
    for i, (M, K, N) in enumerate(CHECK_SHAPES):
        for specials in (False, True):
            a, b, dc = _inputs(M, K, N, 100 + i, specials)
            views = [("contiguous", a, b, dc)]
            if M > 1:  # the same values through transposed (non-contiguous) views
                views.append(("transposed", a.t().contiguous().t(), b.t().contiguous().t(),
                              dc.t().contiguous().t()))
            refs = {
                "forward": (pc.mm_reference(a, b), K),
                "approx dA": (pc.mm_reference(dc, b.t()), N),
                "approx dB": (pc.mm_reference(a.t(), dc), M),
                "exact dA": (pc.exact_grad_a_reference(a, b, dc), N),
                "exact dB": (pc.exact_grad_b_reference(a, b, dc), M),
            }
            for vname, va, vb, vdc in views:
                ga, gb, gdc = va.cuda(), vb.cuda(), vdc.cuda()
                outs = {
                    "forward": (tk.pam_mm(ga, gb), kernels.pam_mm(va, vb)),
                    "approx dA": (tk.pam_mm(gdc, gb.t()), kernels.pam_mm(vdc, vb.t())),
                    "approx dB": (tk.pam_mm(ga.t(), gdc), kernels.pam_mm(va.t(), vdc)),
                    "exact dA": (tk.pam_mm_exact_grad_a(ga, gb, gdc),
                                 kernels.pam_mm_exact_grad_a(va, vb, vdc)),
                    "exact dB": (tk.pam_mm_exact_grad_b(ga, gb, gdc),
                                 kernels.pam_mm_exact_grad_b(va, vb, vdc)),
                }
                for what, (tri, cpu) in outs.items():
                    (ref, mag), n = refs[what]
                    for backend, out in (("triton", tri.cpu()), (cpu_name, cpu)):
                        label = f"{what} {M}x{K}x{N} {vname} specials={specials} [{backend}]"
                        try:
                            worst = pc.check_close(out, ref, mag, n, what=label)
                            if verbose and backend == "triton":
                                print(f"  ok   {label}  (error/tolerance {worst:.3f})")
                        except AssertionError as e:
                            ok = False
                            print(f"  FAIL {label}: {e}")
    return ok


def _bench(fn, rep_ms):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms,
                                   return_mode="median")


def run_timing(sizes, rep_ms):
    from pamtorch.kernels.triton import matmul as tk

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for n in sizes:
        g = torch.Generator(device="cuda").manual_seed(n)
        A = torch.randn(n, n, device="cuda", generator=g)
        B = torch.randn(n, n, device="cuda", generator=g)
        dC = torch.randn(n, n, device="cuda", generator=g)
        t0 = time.time()
        # first calls autotune and compile; keep them out of the timings
        tk.pam_mm(A, B)
        tk.pam_mm(dC, B.t())
        tk.pam_mm(A.t(), dC)
        tk.pam_mm_exact_grad_a(A, B, dC)
        tk.pam_mm_exact_grad_b(A, B, dC)
        torch.cuda.synchronize()
        print(f"  n={n}: autotune/compile {time.time() - t0:.1f}s", flush=True)
        t = {
            "fwd torch": _bench(lambda: torch.matmul(A, B), rep_ms),
            "fwd pam": _bench(lambda: tk.pam_mm(A, B), rep_ms),
            "bwd torch": _bench(lambda: (torch.matmul(dC, B.t()), torch.matmul(A.t(), dC)), rep_ms),
            "approx pam": _bench(lambda: (tk.pam_mm(dC, B.t()), tk.pam_mm(A.t(), dC)), rep_ms),
            "exact pam": _bench(lambda: (tk.pam_mm_exact_grad_a(A, B, dC),
                                         tk.pam_mm_exact_grad_b(A, B, dC)), rep_ms),
        }
        rows.append((n, t))
        del A, B, dC
        torch.cuda.empty_cache()

    print()
    print(f"PAM Triton kernels vs torch.matmul (cuBLAS fp32, TF32 off) on "
          f"{torch.cuda.get_device_name()}; median ms; ratio = t_torch / t_pam "
          f"(\"x of torch.matmul\")")
    print()
    print("| n | fwd torch ms | fwd PAM ms | fwd x | bwd torch ms | approx bwd PAM ms | approx x "
          "| exact bwd PAM ms | exact x | PAM fwd Gterm/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, t in rows:
        terms = n ** 3 / (t["fwd pam"] * 1e-3) / 1e9
        print(f"| {n} | {t['fwd torch']:.3f} | {t['fwd pam']:.3f} | "
              f"{t['fwd torch'] / t['fwd pam']:.3f} | {t['bwd torch']:.3f} | "
              f"{t['approx pam']:.3f} | {t['bwd torch'] / t['approx pam']:.3f} | "
              f"{t['exact pam']:.3f} | {t['bwd torch'] / t['exact pam']:.3f} | {terms:.0f} |")
    return rows


def run_step_checks(rtol_loss=1e-4, rtol_grad=1e-2, device="cuda") -> bool:
    """pam-full forward and backward of the stock encoder (eval mode) on CUDA vs the CPU."""
    from pamtorch import bench
    from pamtorch.recipes import train as T

    task, hp = bench._step_setup("encoder", (), 0)
    model = task.model.eval()
    batch = task.batch(0, hp.batch_size, 0)
    ctx = T.arith_context("pam-full")

    def run(device):
        m = model.to(device)
        m.zero_grad(set_to_none=True)
        with ctx():
            loss, _ = task.loss(m, batch.to(device))
            loss.backward()
        return loss.item(), {n: p.grad.detach().cpu().clone() for n, p in m.named_parameters()}

    t0 = time.time()
    cpu_loss, cpu_grads = run("cpu")
    gpu_loss, gpu_grads = run(device)
    ok = True
    rel = abs(gpu_loss - cpu_loss) / abs(cpu_loss)
    print(f"  pam-full encoder loss: cpu {cpu_loss:.7f}, cuda {gpu_loss:.7f}, relative difference {rel:.2e} "
          f"(limit {rtol_loss:g})")
    if not (rel <= rtol_loss):
        ok = False
        print("  FAIL loss")
    worst = (0.0, "")
    for n, g in cpu_grads.items():
        d = float((gpu_grads[n] - g).norm() / g.norm().clamp_min(1e-30))
        if not d <= rtol_grad:
            ok = False
            print(f"  FAIL gradient of {n}: relative difference {d:.2e} (limit {rtol_grad:g})")
        worst = max(worst, (d, n))
    print(f"  largest relative gradient difference {worst[0]:.2e} ({worst[1]}); {time.time() - t0:.1f}s")
    return ok


def run_steps(recipes, reps, data_dir=None, device="cuda"):
    from pamtorch import bench

    tables = []
    for recipe in recipes:
        train_args = ()
        if recipe == "translate" and data_dir:
            train_args = ("--data-dir", data_dir, "--preset", "small")
        t0 = time.time()
        rows = bench.bench_step(recipe, ("fp32", "pam-matmul", "pam-full"), reps=reps,
                                train_args=train_args, device=device)
        table = bench.format_step_table(rows)
        print(f"{recipe} ({' '.join(train_args) or 'defaults'}; {time.time() - t0:.0f}s):\n{table}\n",
              flush=True)
        tables.append(table)
    return tables


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench time budget per measurement")
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--skip-matmul", action="store_true", help="no matmul timing")
    p.add_argument("--step-recipes", nargs="*", default=["encoder", "vit", "translate"],
                   help="recipes whose training step is timed on the GPU (none: no step timing)")
    p.add_argument("--step-reps", type=int, default=10)
    p.add_argument("--data-dir", default=None, help="translate: the de-en corpus folder")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA device available (torch.cuda.is_available() "
                 "is False); this script checks and times the Triton kernels on a GPU. "
                 "On CPU run: TRITON_INTERPRET=1 pytest tests/test_triton_interpret.py")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        sys.exit(f"benchmarks/gpu.py: triton is not importable ({e}); pip install triton")

    if not args.skip_checks:
        print("Correctness checks (Triton on CUDA and the CPU backend vs the float64 reference):")
        if not run_checks():
            sys.exit("benchmarks/gpu.py: correctness checks FAILED (see above)")
        print("Training-step check (pam-full on CUDA against the CPU):", flush=True)
        if not run_step_checks():
            sys.exit("benchmarks/gpu.py: training-step check FAILED (see above)")
        print("All checks passed.\n", flush=True)
    if args.check_only:
        return
    if not args.skip_matmul:
        print("Timing:")
        run_timing(args.sizes, args.rep_ms)
    if args.step_recipes:
        print(f"\nTraining steps on {torch.cuda.get_device_name()} (pamtorch bench step --device cuda, "
              f"{args.step_reps} interleaved steps, median):\n", flush=True)
        run_steps(args.step_recipes, args.step_reps, args.data_dir)


if __name__ == "__main__":
    main()
