"""The PAM matrix products at the shapes and layouts of real training steps, against torch.

    python benchmarks/matmul_shapes.py [--threads 1] [--reps 7]

Square dense products (``pamtorch bench matmul``) hide what a step's products look like: a
weight gradient ``g^T x`` has a transposed (column-major) operand and a long reduction, ReLU
leaves zeros in one operand, and attention multiplies hundreds of 17 x 16 matrices. Each row
times ``pamtorch.kernels.cpu.pam_mm``/``pam_bmm`` and ``torch.mm``/``torch.bmm`` on the same
operands, interleaved in one process (median of ``--reps`` rounds of CPU time), and prints the
ratio PAM / torch (1.0 = as fast, 2.0 = twice the time). Shapes: the stock encoder of
``pamtorch bench step --recipe encoder`` (1024 tokens, d 128, FFN 2048), the vit recipe (64
images of 17 tokens, d 64, 4 heads of 16, MLP 128) and the output layer of the translate
recipe's tiny preset (about 2000 target tokens a batch, d 64, 8000-token vocabulary).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _cases():
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    T, V = 1024, 64 * 17
    mm = [
        ("encoder FFN up, x W1^T", r(T, 128), r(2048, 128).t()),
        ("encoder FFN down, relu(h) W2^T (zeros in A)", r(T, 2048).relu(), r(128, 2048).t()),
        ("encoder dW1 = g1^T x (A transposed, zeros)", r(T, 2048).relu().t(), r(T, 128)),
        ("encoder dW2 = g2^T relu(h) (A transposed, zeros in B)", r(T, 128).t(), r(T, 2048).relu()),
        ("encoder in-proj dW = g^T x (A transposed)", r(T, 384).t(), r(T, 128)),
        ("vit qkv, x Wqkv^T", r(V, 64), r(192, 64).t()),
        ("vit dW fc1 = g^T x (A transposed)", r(V, 128).t(), r(V, 64)),
        ("vit dW fc2 = g^T relu(h) (A transposed, zeros in B)", r(V, 64).t(), r(V, 128).relu()),
        ("translate vocabulary projection, x Wout^T", r(2000, 64), r(8000, 64).t()),
        ("translate vocabulary dX = g Wout", r(2000, 8000), r(8000, 64)),
        ("translate vocabulary dW = g^T x (A transposed)", r(2000, 8000).t(), r(2000, 64)),
    ]
    bmm = [
        ("vit attention q k^T (B transposed)", r(256, 17, 16), r(256, 17, 16).transpose(1, 2)),
        ("vit attention p v", r(256, 17, 17), r(256, 17, 16)),
        ("vit attention dp^T q (A transposed)", r(256, 17, 17).transpose(1, 2), r(256, 17, 16)),
    ]
    return mm, bmm


def _time(fn, reps, n):
    for _ in range(2):
        fn()
    out = []
    for _ in range(reps):
        t = time.process_time()
        for _ in range(n):
            fn()
        out.append((time.process_time() - t) / n)
    return statistics.median(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from pamtorch.kernels import cpu

    if not cpu.available():
        raise SystemExit("the compiled CPU kernels are not available here")
    mm, bmm = _cases()
    print(f"threads {args.threads}, torch {torch.__version__}, CPU time per call, median of {args.reps}")
    print("| product | shape (M x K x N) | torch ms | PAM ms | PAM / torch |")
    print("|---|---|---|---|---|")
    for name, a, b in mm + bmm:
        batched = a.dim() == 3
        ref, pam = (torch.bmm, cpu.pam_bmm) if batched else (torch.mm, cpu.pam_mm)
        n = max(1, int(2e8 / (a.numel() // a.shape[-1] * a.shape[-1] * b.shape[-1])))  # ~0.1 s per round
        t_ref = _time(lambda: ref(a, b), args.reps, n)
        t_pam = _time(lambda: pam(a, b), args.reps, n)
        shape = ("%d x " % a.shape[0] if batched else "") + "%d x %d x %d" % (a.shape[-2], a.shape[-1], b.shape[-1])
        print(f"| {name} | {shape} | {t_ref * 1e3:.3f} | {t_pam * 1e3:.3f} | {t_pam / t_ref:.2f} |")


if __name__ == "__main__":
    main()
