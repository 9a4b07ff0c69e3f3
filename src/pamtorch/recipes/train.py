"""``pamtorch train RECIPE``: the training loop shared by the recipes (vit, translate, lm).

AdamW with linear warmup and cosine decay, label smoothing, gradient clipping, dropout; a tqdm
progress bar; per-step JSONL logs, ``metrics.json``, plots and atomic checkpoints in ``--out``;
exact ``--resume``; ``--compare`` of arithmetic variants; DistributedDataParallel under torchrun
with a multiplication-free gradient average (all-reduce SUM, then ``pamtorch.div`` by world size).

The arithmetic: ``--arith fp32`` runs stock PyTorch; any other name is a ``pamtorch.Config`` preset
(``pam-matmul``, ``pam-full``, ``paper``) and each training step (forward, loss, backward, clipping
and the AdamW step) and each evaluation runs inside ``pamtorch.mode(config)``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

RECIPES = ("vit", "translate", "lm")
DEFAULT_COMPARE = "fp32,pam-matmul,pam-full"
# Horowitz (ISSCC 2014), 45 nm, as in the paper's Table 4: energy per operation in pJ
ENERGY_PJ = {"fp32_mul": 3.7, "fp32_add": 0.9, "int32_add": 0.1}


class NonFiniteLoss(RuntimeError):
    pass


def get_recipe(name):
    import importlib

    if name not in RECIPES:
        raise SystemExit(f"unknown recipe '{name}' (expected one of {', '.join(RECIPES)})")
    return importlib.import_module(f"{__package__ or 'pamtorch.recipes'}.{name}")


# ----------------------------------------------------------------------------- arithmetic


def arith_context(arith: str, derivative=None):
    """A factory of context managers that run code in the chosen arithmetic.

    All variants use the math (unfused) attention kernel and no fused transformer fast path, so the
    only difference between them is the arithmetic of the aten ops.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mode_cfg = None
    if arith != "fp32":
        import pamtorch

        if not (hasattr(pamtorch, "mode") and hasattr(pamtorch, "Config")):
            raise RuntimeError(f"--arith {arith} needs pamtorch.mode and pamtorch.Config, "
                               f"which this pamtorch install does not provide")
        try:
            mode_cfg = pamtorch.Config.from_name(arith, derivative)
        except ValueError as e:
            raise SystemExit(f"--arith {arith}: {e} (or fp32)") from None

    @contextlib.contextmanager
    def ctx():
        prev = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
                if mode_cfg is not None:
                    import pamtorch

                    stack.enter_context(pamtorch.mode(mode_cfg))
                yield
        finally:
            torch.backends.mha.set_fastpath_enabled(prev)

    return ctx


def pa_divide(t: torch.Tensor, n: int, arith: str = "pam") -> torch.Tensor:
    """t / n for the gradient average: ``pamtorch.div`` (piecewise affine) unless the run is fp32.

    If ``pamtorch.div`` is not available, power-of-two world sizes divide in IEEE arithmetic, which is
    exact there and equal to the PA result; other sizes raise.
    """
    if n == 1:
        return t
    if arith == "fp32":
        return t.div_(n)
    import pamtorch

    div = getattr(pamtorch, "div", None)
    if div is not None:
        return div(t, n)
    if n & (n - 1) == 0:
        return t.div_(n)
    raise RuntimeError(f"world size {n} is not a power of two and pamtorch.div is not available")


def make_allreduce_hook(arith: str):
    """DDP comm hook: all-reduce the gradient bucket with SUM, then divide by the world size with PA."""
    import torch.distributed as dist

    try:  # the all-reduce (a sum) is communication, not arithmetic to convert: run it outside pamtorch.mode
        from torch.utils._python_dispatch import _disable_current_modes
    except ImportError:  # pragma: no cover
        _disable_current_modes = contextlib.nullcontext

    def hook(state, bucket):
        world = dist.get_world_size()
        with _disable_current_modes():
            fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True).get_future()
        return fut.then(lambda f: pa_divide(f.value()[0], world, arith))

    return hook


def count_macs(task, model, batch) -> int:
    """Multiply-accumulates of one training step (forward + backward) in matmuls, convolutions and
    attention, counted by torch's FlopCounterMode on one batch (2 flops = 1 MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    from torch.nn.attention import SDPBackend, sdpa_kernel

    counter = FlopCounterMode(display=False)
    rng = torch.get_rng_state()
    with counter, sdpa_kernel(SDPBackend.MATH):
        loss, _ = task.loss(model, batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    return counter.get_total_flops() // 2


def energy_estimate_mj(macs: int, arith: str) -> float:
    """ESTIMATE of the energy of the matmul/conv/attention MACs of one step, in millijoules.

    fp32: a multiply (3.7 pJ) + an add (0.9 pJ) per MAC; PA variants: the multiply becomes an
    integer add (0.1 pJ). Everything else (elementwise ops, optimizer, memory traffic) is ignored.
    """
    mul = ENERGY_PJ["fp32_mul"] if arith == "fp32" else ENERGY_PJ["int32_add"]
    return macs * (mul + ENERGY_PJ["fp32_add"]) * 1e-9


# ----------------------------------------------------------------------------- arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", choices=RECIPES, help="model to train")
    p.add_argument("--preset", help="model size (vit: tiny, deit-tiny; translate: tiny, iwslt; lm: tiny, small)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field, e.g. --set depth=2 (repeatable)")
    p.add_argument("--arith", default="fp32",
                   help="fp32 (stock PyTorch) or a pamtorch config preset: pam-matmul, pam-full, paper")
    p.add_argument("--derivative", choices=["approx", "exact", "paper"], default=None,
                   help="derivative of the PA operations (default: the config preset's)")
    p.add_argument("--compare", nargs="?", const=DEFAULT_COMPARE, default=None, metavar="A,B,...",
                   help=f"train several arithmetic variants with the same seed and data order "
                        f"(default {DEFAULT_COMPARE}) and write a comparison table")
    p.add_argument("--data", default=None,
                   help="vit: digits (built-in), mnist, cifar10, imagefolder; translate: toy (built-in) or "
                        "parallel; lm: sklearn-docs (built-in) or text. Guessed from --data-dir if omitted")
    p.add_argument("--data-dir", default=None, help="folder (or file for lm) with the data")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=float, default=None, help="passes over the training data")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (all processes together)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine")
    p.add_argument("--warmup", type=float, default=None, help="warmup steps (< 1: fraction of the steps)")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--label-smoothing", type=float, default=None)
    p.add_argument("--clip", type=float, default=None, help="max gradient norm (0: no clipping)")
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default runs/RECIPE-ARITH)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: 10 per run)")
    p.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints (default: --eval-every)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--src", default="de", help="translate: source language suffix")
    p.add_argument("--tgt", default="en", help="translate: target language suffix")
    p.add_argument("--beam", type=int, default=5, help="translate: beam size for BLEU")
    p.add_argument("--eval-sentences", type=int, default=500, help="translate: sentences translated for BLEU")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size")
    p.add_argument("--tokenizer", choices=["char", "bpe"], default="char", help="lm: characters or BPE")
    # for tests: stop as if interrupted after this step / inject a NaN loss at this step
    p.add_argument("--stop-at", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug-nan-at", type=int, default=None, help=argparse.SUPPRESS)


def add_train_parser(subparsers):
    """Register ``train`` on the pamtorch CLI's subparsers."""
    p = subparsers.add_parser("train", help="train a recipe model (vit, translate, lm)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run_train)
    return p


def _parse_value(text, current):
    if isinstance(current, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    return text


def resolve_hparams(args, recipe):
    d = recipe.DEFAULTS
    preset = args.preset or d["preset"]
    if preset not in recipe.PRESETS:
        raise SystemExit(f"unknown preset '{preset}' for {args.recipe} (expected one of {', '.join(recipe.PRESETS)})")
    cfg = recipe.PRESETS[preset]
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(cfg)}:
            raise SystemExit(f"--set {item}: {type(cfg).__name__} has no field '{key}'")
        overrides[key] = _parse_value(value, getattr(cfg, key))
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    cfg = dataclasses.replace(cfg, **overrides)

    def pick(name):
        v = getattr(args, name)
        return d.get(name) if v is None else v

    return SimpleNamespace(preset=preset, model_config=cfg, lr=pick("lr"), batch_size=pick("batch_size"),
                           weight_decay=pick("weight_decay"), warmup=pick("warmup"),
                           label_smoothing=pick("label_smoothing"), clip=pick("clip"),
                           betas=tuple(d.get("betas", (0.9, 0.999))), extra=d)


def lr_at(step, total, base, warmup, min_lr=0.0):
    """Linear warmup to ``base`` over ``warmup`` steps, then cosine decay to ``min_lr``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (base - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------- files


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace (never a partial file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def read_jsonl(path: Path):
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _truncate_jsonl(path: Path, last_step: int) -> None:
    rows = [r for r in read_jsonl(path) if r["step"] <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, (list, tuple)):
        return [_jsonable(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    return obj


def plot_run(out: Path, train_rows, eval_rows, metric: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in train_rows]
    a.plot(steps, [r["loss"] for r in train_rows], alpha=0.3, label="train loss")
    a.plot(steps, _ema([r["loss"] for r in train_rows]), label="train loss (EMA)")
    if eval_rows:
        a.plot([r["step"] for r in eval_rows], [r["valid_loss"] for r in eval_rows], "o-", label="valid loss")
        b.plot([r["step"] for r in eval_rows], [r.get(metric) for r in eval_rows], "o-", color="C2")
    a.set_xlabel("step"), a.set_ylabel("loss"), a.legend()
    b.set_xlabel("step"), b.set_ylabel(f"valid {metric}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


def _ema(xs, beta=0.9):
    out, m = [], None
    for x in xs:
        m = x if m is None else beta * m + (1 - beta) * x
        out.append(m)
    return out


# ----------------------------------------------------------------------------- one run


def _dist_info():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_one(args, arith: str, out: Path, show_progress: bool = True) -> dict:
    """Train one arithmetic variant into ``out``; returns the final metrics (also in metrics.json)."""
    import torch.distributed as dist

    rank, world = _dist_info()
    recipe = get_recipe(args.recipe)
    hp = resolve_hparams(args, recipe)
    if hp.batch_size % world:
        raise SystemExit(f"--batch-size {hp.batch_size} must be divisible by the {world} processes")
    if args.device == "auto":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    ctx = arith_context(arith, args.derivative)  # fails early if the arithmetic is unavailable
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    resume = bool(args.resume and ckpt_path.is_file())
    if args.resume and not resume and rank == 0:
        print(f"--resume: no checkpoint at {ckpt_path}, starting from scratch", file=sys.stderr)

    torch.manual_seed(args.seed)
    task = recipe.Task(args, hp, out, device)
    model = task.model.to(device)
    raw_model = model
    n_params = sum(p.numel() for p in model.parameters())
    spe = task.steps_per_epoch(hp.batch_size)
    if args.steps is not None:
        total = args.steps
    elif args.epochs is not None:
        total = max(1, int(round(args.epochs * spe)))
    elif "steps" in recipe.DEFAULTS:
        total = recipe.DEFAULTS["steps"]
    else:
        total = max(1, int(round(recipe.DEFAULTS["epochs"] * spe)))
    warmup = int(hp.warmup * total) if hp.warmup < 1 else int(hp.warmup)
    eval_every = args.eval_every or max(1, total // 10)
    ckpt_every = args.ckpt_every or eval_every

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith(("pos_embed", "cls_token"))]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.endswith(("pos_embed", "cls_token")))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr, betas=hp.betas)

    meta = {"recipe": args.recipe, "preset": hp.preset, "arith": arith, "derivative": args.derivative,
            "model_config": dataclasses.asdict(task.cfg), "seed": args.seed, "batch_size": hp.batch_size}
    start = 0
    if resume:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        for key in ("recipe", "arith", "model_config", "seed", "batch_size"):
            if ckpt["meta"].get(key) != meta[key]:
                raise SystemExit(f"--resume: {ckpt_path} was written with {key}={ckpt['meta'].get(key)!r}, "
                                 f"this run has {key}={meta[key]!r}")
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["step"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if torch.cuda.is_available() and ckpt.get("rng_cuda"):
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
        if rank == 0:
            _truncate_jsonl(out / "train_log.jsonl", start)
            # a finished run's final evaluation is redone on resume (it may have been interrupted)
            _truncate_jsonl(out / "eval_log.jsonl", start - 1 if start == total else start)
            print(f"resumed from {ckpt_path} at step {start}", file=sys.stderr)
    elif rank == 0:
        for name in ("train_log.jsonl", "eval_log.jsonl"):
            (out / name).unlink(missing_ok=True)

    macs = count_macs(task, raw_model, task.batch(0, hp.batch_size, args.seed)) if rank == 0 else 0
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        model.register_comm_hook(None, make_allreduce_hook(arith))


    def save_checkpoint(step):
        if rank == 0:
            atomic_torch_save({
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "meta": meta,
            }, ckpt_path)
        if world > 1:
            dist.barrier()

    def evaluate(step, final=False):
        with ctx():
            m = task.evaluate(raw_model, final=final)
        m = {"step": step, **m}
        if rank == 0:
            with open(out / "eval_log.jsonl", "a") as f:
                f.write(json.dumps({k: v for k, v in m.items() if k != "examples"}) + "\n")
        return m

    bar = None
    if rank == 0 and show_progress and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc=f"{args.recipe}/{arith}", dynamic_ncols=True,
                   mininterval=0.5, file=sys.stderr)
    step_times, log = [], open(out / "train_log.jsonl", "a") if rank == 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    last = None
    t_run = time.perf_counter()
    model.train()
    try:
        for step in range(start, total):
            lr = lr_at(step, total, hp.lr, warmup, args.min_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            batch = task.batch(step, hp.batch_size, args.seed, rank, world)
            # dropout randomness: a pure function of (seed, step, rank), so --resume is exact
            torch.manual_seed((args.seed * 1_000_003 + step) * 64 + rank)
            t0 = time.perf_counter()
            with ctx():
                loss, n_items = task.loss(model, batch)
                if args.debug_nan_at is not None and step + 1 == args.debug_nan_at:
                    loss = loss + float("nan")
            loss_value = loss.detach().float().reshape(1).clone()
            if world > 1:  # for the log and the finiteness check only (division in Python)
                dist.all_reduce(loss_value, op=dist.ReduceOp.SUM)
            loss_value = loss_value.item() / world
            if not math.isfinite(loss_value):
                raise NonFiniteLoss(f"non-finite loss ({loss_value}) at step {step + 1}")
            with ctx():
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if hp.clip and hp.clip > 0:
                    gnorm = torch.nn.utils.clip_grad_norm_(params, hp.clip)
                else:
                    gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                gnorm = float(gnorm)
                if not math.isfinite(gnorm):
                    raise NonFiniteLoss(f"non-finite gradient norm ({gnorm}) at step {step + 1}")
                optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            step_times.append(dt)
            row = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": gnorm, "step_time": dt,
                   f"{task.unit}_per_s": n_items * world / dt}
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", **{f"{task.unit}/s": f"{n_items * world / dt:.0f}"})
            done = step + 1 == total
            # checkpoint before evaluating: the trained model is on disk before a (long) final
            # evaluation (evaluation draws no random numbers, so the saved state is the same)
            if (step + 1) % ckpt_every == 0 or done or (args.stop_at is not None and step + 1 == args.stop_at):
                save_checkpoint(step + 1)
            if (step + 1) % eval_every == 0 or done:
                last = evaluate(step + 1, final=done)
                if bar is not None:
                    bar.write(f"step {step + 1}: " + ", ".join(
                        f"{k} {v:.4f}" for k, v in last.items() if isinstance(v, float)))
            if args.stop_at is not None and step + 1 == args.stop_at and not done:
                break
        if start == total and total > 0:  # --resume of a finished run: (re)do the final evaluation
            last = evaluate(total, final=True)
    except NonFiniteLoss as e:
        msg = (f"{e}; stopping. The last good checkpoint is {ckpt_path}" if ckpt_path.is_file()
               else f"{e}; stopping (no checkpoint was written yet)")
        if bar is not None:
            bar.close()
        raise SystemExit(f"pamtorch train: {msg}") from None
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    wall = time.perf_counter() - t_run

    train_rows, eval_rows = (read_jsonl(out / "train_log.jsonl"), read_jsonl(out / "eval_log.jsonl"))
    if last is None:  # stopped early (--stop-at) before an evaluation
        last = eval_rows[-1] if eval_rows else {}
    times = step_times[3:] if len(step_times) > 6 else step_times
    tail = [r["loss"] for r in train_rows[-max(1, min(50, len(train_rows) // 10)):]]
    metrics = {
        **meta, "steps": total, "steps_done": train_rows[-1]["step"] if train_rows else start,
        "completed": bool(train_rows) and train_rows[-1]["step"] == total,
        "params": n_params, "world_size": world, "device": str(device),
        **{k: v for k, v in last.items() if k != "step"},
        "train_loss": sum(tail) / len(tail) if tail else None,
        "step_time_s": statistics.median(times) if times else None,
        "wall_time_s": wall, "macs_per_step": macs,
        "energy_mj_per_step_estimate": energy_estimate_mj(macs, arith),
        "energy_note": "ESTIMATE: matmul/conv/attention MACs of fwd+bwd per step x (mul + add) energy, "
                       "Horowitz 45nm (fp32 mul 3.7 pJ, fp32 add 0.9 pJ, int32 add 0.1 pJ for a PA multiply)",
    }
    if rank == 0:
        atomic_write_text(out / "metrics.json", json.dumps(_jsonable(metrics), indent=2) + "\n")
        try:
            plot_run(out, train_rows, eval_rows, task.metric, f"{args.recipe} {hp.preset} {arith}")
        except ImportError:
            print("matplotlib not installed: no plots", file=sys.stderr)
    return metrics


# ----------------------------------------------------------------------------- compare


def _fmt(v, spec=".4f"):
    return "—" if v is None else format(v, spec)


def compare_table(results: dict, metric: str) -> str:
    base = results.get("fp32") if "error" not in results.get("fp32", {"error": 1}) else None
    lines = [f"| variant | valid_loss | Δ vs fp32 | {metric} | Δ vs fp32 | step time (ms) | × fp32 | "
             f"energy/step (mJ, estimate) | × fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in results.items():
        if "error" in m:
            lines.append(f"| {name} | failed: {m['error']} | | | | | | | |")
            continue

        def delta(key):
            if base is None or m.get(key) is None or base.get(key) is None:
                return None
            return m[key] - base[key]

        def ratio(key):
            if base is None or not base.get(key) or m.get(key) is None:
                return None
            return m[key] / base[key]

        st = m.get("step_time_s")
        lines.append(f"| {name} | {_fmt(m.get('valid_loss'))} | {_fmt(delta('valid_loss'), '+.4f')} | "
                     f"{_fmt(m.get(metric))} | {_fmt(delta(metric), '+.4f')} | "
                     f"{_fmt(None if st is None else st * 1e3, '.1f')} | {_fmt(ratio('step_time_s'), '.2f')} | "
                     f"{_fmt(m.get('energy_mj_per_step_estimate'), '.3g')} | "
                     f"{_fmt(ratio('energy_mj_per_step_estimate'), '.2f')} |")
    return "\n".join(lines)


def plot_compare(out: Path, names, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name in names:
        tr, ev = read_jsonl(out / name / "train_log.jsonl"), read_jsonl(out / name / "eval_log.jsonl")
        if tr:
            a.plot([r["step"] for r in tr], _ema([r["loss"] for r in tr]), label=name)
        if ev:
            b.plot([r["step"] for r in ev], [r.get(metric) for r in ev], "o-", label=name)
    a.set_xlabel("step"), a.set_ylabel("train loss (EMA)"), a.legend()
    b.set_xlabel("step"), b.set_ylabel(f"valid {metric}"), b.legend()
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=100)
    plt.close(fig)


def run_compare(args, out: Path) -> dict:
    rank, _ = _dist_info()
    names = [n.strip() for n in args.compare.split(",") if n.strip()]
    results = {}
    for name in names:
        try:
            results[name] = train_one(args, name, out / name)
        except (RuntimeError, SystemExit, ImportError, AttributeError, ValueError) as e:
            if isinstance(e, SystemExit) and "non-finite" not in str(e):
                raise
            results[name] = {"error": str(e).splitlines()[0][:200]}
            if rank == 0:
                print(f"{name}: {results[name]['error']}", file=sys.stderr)
    metric = get_recipe(args.recipe).Task.metric
    if rank == 0:
        table = compare_table(results, metric)
        header = (f"# pamtorch train {args.recipe} --compare\n\nSame seed ({args.seed}) and data order for every "
                  f"variant. Energy is an ESTIMATE of the matmul/conv/attention MACs only (Horowitz 45 nm: "
                  f"fp32 multiply 3.7 pJ + add 0.9 pJ per MAC; PA: int32 add 0.1 pJ + add 0.9 pJ).\n\n")
        atomic_write_text(out / "compare.md", header + table + "\n")
        atomic_write_text(out / "compare.json", json.dumps(_jsonable(results), indent=2) + "\n")
        try:
            plot_compare(out, [n for n in names if "error" not in results[n]], metric)
        except ImportError:
            pass
        print(table)
    return results


def run_train(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    import torch.distributed as dist

    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    try:
        out = Path(args.out or f"runs/{args.recipe}-{'compare' if args.compare else args.arith}")
        if args.compare:
            run_compare(args, out)
        else:
            m = train_one(args, args.arith, out)
            if _dist_info()[0] == 0:
                shown = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                print(json.dumps({k: shown[k] for k in shown if k in (
                    "valid_loss", "accuracy", "bleu", "test_bleu", "perplexity", "train_loss", "step_time_s",
                    "wall_time_s")}, indent=None))
                print(f"wrote {out}/metrics.json, train_log.jsonl, eval_log.jsonl, checkpoint.pt, curves.png")
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pamtorch.recipes.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run_train(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
