"""``pamtorch train RECIPE``: the training loop shared by the recipes (vit, cnn, translate, lm).

AdamW (or SGD with Nesterov momentum, the cnn recipe's) with linear warmup and cosine decay, label
smoothing, gradient clipping, dropout, gradient accumulation (``--accum``); a tqdm progress bar;
per-step JSONL logs, ``metrics.json``, plots and atomic checkpoints in ``--out``; exact ``--resume``;
``--compare`` of arithmetic variants; DistributedDataParallel under torchrun with a
multiplication-free gradient average (all-reduce SUM, then ``pamtorch.div`` by world size).

A run's folder is kept: training into an ``--out`` that holds a run needs ``--resume`` (continue it)
or ``--overwrite`` (replace it). ``--resume`` refuses settings that differ from the checkpoint's
unless ``--allow-changes``, which records each change in ``changes.jsonl``. A checkpoint is written
only when every tensor of the model and the optimizer is finite; a non-finite loss, gradient norm,
parameter or optimizer state stops the run with one line naming the last good checkpoint (exit
status 1). A mistake in an argument, a data file or ``--out`` is one line ``pamtorch: error: ...``
and exit status 2; ``--debug`` shows the traceback instead.

The arithmetic: ``--arith fp32`` runs stock PyTorch; any other name is a ``pamtorch.Config`` preset
(``pam-matmul``, ``pam-full``, ``paper``, ...) or ``pam-conv`` (the paper's CNN variant: the matrix
products, convolutions included, PA and everything else exact, BatchNorm included), and each
training step (forward, loss, backward, gradient average, clipping and the optimizer step) runs
inside ``pamtorch.mode(config)``. Evaluation and decoding run there too (``--eval-arith same``) or
in standard arithmetic (``--eval-arith exact``, as the paper's released code decodes).

Presets set the model and, where the paper gives them, the training settings; every value given on
the command line wins. Sources: the paper's released commands (epfml/pam README).
  vit deit-tiny      DeiT-Tiny, drop path 0.1, LayerNorm eps 1e-6, AdamW lr 5e-4, weight decay 0.05,
                     5 warmup epochs, min lr 1e-5, batch 256, no clipping, light augmentation, 600
                     epochs ("TIMM DeiT CIFAR10": -b 64 on 4 processes; timm's DeiT eps)
  translate iwslt    transformer_iwslt_de_en, lr 5e-4, 4000 warmup steps, 22021 steps, --max-tokens 4096,
                     dropout 0.3 with attention and activation dropout 0, no clipping, beam 5 with max
                     length 1.2 x source + 10 ("FAIRSEQ IWSLT2014-De-En", fairseq's architecture defaults)
  cnn resnet20/110   pre-activation ResNet-20/110, SGD (Nesterov) momentum 0.9, lr 0.2, batch 256,
                     weight decay 2e-4, 5 warmup epochs, min lr 1e-5 ("Pre-residual RN20/RN110")
  cnn vgg13, vgg     VGG13 without BN (vgg: a small VGG with BN), lr 0.05, batch 128, weight decay 5e-4
                     ("VGG13 without BN")
  vit tiny, translate tiny/small, lm tiny/small: sizes for a CPU (lm small: nanoGPT's shakespeare-char)
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

from .data import UserError, atomic_write, stale_temp_files

RECIPES = ("vit", "cnn", "translate", "lm")
IMAGE_RECIPES = ("vit", "cnn")
DEFAULT_COMPARE = "fp32,pam-matmul,pam-full"
# Horowitz (ISSCC 2014), 45 nm, as in the paper's Table 4: energy per operation in pJ
ENERGY_PJ = {"fp32_mul": 3.7, "fp32_add": 0.9, "int32_add": 0.1}
# what a run writes into --out; "holds a run" = one of the first four exists
RUN_FILES = ("checkpoint.pt", "train_log.jsonl", "eval_log.jsonl", "metrics.json", "changes.jsonl",
             "tokenizer.json", "curves.png")
COMPARE_FILES = ("compare.md", "compare.json", "compare.png")


class NonFiniteLoss(RuntimeError):
    """Training diverged (a non-finite loss, gradient norm, parameter or optimizer state): the run
    stops with one line naming the last good checkpoint, exit status 1."""


def get_recipe(name):
    import importlib

    if name not in RECIPES:
        raise UserError(f"unknown recipe '{name}' (expected one of {', '.join(RECIPES)})")
    return importlib.import_module(f"{__package__ or 'pamtorch.recipes'}.{name}")


# ----------------------------------------------------------------------------- errors


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``pamtorch: error: MESSAGE (see 'PROG --help')``,
    exit status 2 (subparsers inherit the class)."""

    def error(self, message):
        self.exit(2, f"pamtorch: error: {message} (see '{self.prog} --help')\n")


def report_errors(func, args) -> int:
    """Run ``func(args)``; a user error (a bad argument, data file, checkpoint or --out, a failed
    write) prints one line ``pamtorch: error: ...`` and returns 2, divergence (:class:`NonFiniteLoss`)
    prints one line and returns 1. With ``args.debug`` the exception propagates with its traceback."""
    try:
        return int(func(args) or 0)
    except (UserError, NonFiniteLoss, OSError) as e:
        if getattr(args, "debug", False):
            raise
        if isinstance(e, OSError) and e.filename is not None:
            msg = f"{e.filename}: {e.strerror or e}"
        else:
            msg = str(e)
        print(f"pamtorch: error: {' '.join(msg.split())}", file=sys.stderr)
        return 1 if isinstance(e, NonFiniteLoss) else 2


def _number(kind, low, low_ok, high=None, high_ok=False, what=None):
    """An argparse ``type``: a finite ``kind`` (int or float) above ``low`` (or equal if ``low_ok``)
    and below ``high`` (or equal if ``high_ok``), else an error that says what is expected."""
    lo = f"{'>=' if low_ok else '>'} {low}"
    hi = "" if high is None else f" and {'<=' if high_ok else '<'} {high}"
    expected = what or f"{'an integer' if kind is int else 'a number'} {lo}{hi}"

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (math.isfinite(v) and (v >= low if low_ok else v > low)
                and (high is None or (v <= high if high_ok else v < high))):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v

    return parse


POSITIVE_INT = _number(int, 0, False, what="a positive integer")
POSITIVE = _number(float, 0, False, what="a positive number")
NON_NEGATIVE = _number(float, 0, True, what="a number >= 0")
PROBABILITY = _number(float, 0, True, 1, False)
SEED = _number(int, 0, True, 2 ** 32, False)


def MANTISSA_BITS(text):
    """An argparse ``type``: the integers ``Config.with_mantissa_bits`` accepts (its own check)."""
    from pamtorch.arith import check_mantissa_bits

    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to 23, got {text!r}") from None
    try:
        return check_mantissa_bits(k, "Config.with_mantissa_bits")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_DERIVATIVES = ("approx", "exact")


def DERIVATIVE(text):
    """An argparse ``type`` for ``--derivative``: ``approx``, ``exact`` or ``paper`` for every PA
    kind, or ``KIND=approx|exact`` pairs joined by commas for some kinds (the paper's derivative
    ablations, e.g. ``matmul=exact`` or ``softmax=exact``; the loss kind also takes
    ``loss=balanced``); the text is kept as given."""
    from pamtorch.config import KINDS

    if text in _DERIVATIVES + ("paper",):
        return text
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from approx, exact, paper, or "
                                         f"KIND=approx|exact[,KIND=...] with KIND one of {', '.join(KINDS)})")
    seen = set()
    for part in text.split(","):
        kind, _, d = part.partition("=")
        if kind not in KINDS:
            raise argparse.ArgumentTypeError(f"{part!r}: unknown op kind {kind!r}; kinds are {', '.join(KINDS)}")
        if d not in _DERIVATIVES and not (kind == "loss" and d == "balanced"):
            also = " (or balanced for the loss kind)" if d == "balanced" else ""
            raise argparse.ArgumentTypeError(f"{part!r}: the derivative must be approx or exact{also}, got {d!r}")
        if kind in seen:
            raise argparse.ArgumentTypeError(f"{text!r}: op kind {kind!r} is given twice")
        seen.add(kind)
    return text


def _with_derivative(cfg, derivative):
    """``cfg`` with ``--derivative`` applied: one derivative for every PA kind, or per-kind pairs
    (a kind the config leaves exact cannot take one)."""
    if derivative in (None, "paper"):
        return cfg
    if "=" not in derivative:
        return cfg.with_derivative(derivative)
    kinds = {}
    for part in derivative.split(","):
        kind, _, d = part.partition("=")
        if not cfg.kind(kind).pa:
            raise UserError(f"--derivative {derivative}: the {kind!r} kind is exact arithmetic in this "
                            f"--arith, so it has no PA derivative to choose")
        kinds[kind] = dataclasses.replace(cfg.kind(kind), derivative=d)
    return cfg.replace(**kinds)


# ----------------------------------------------------------------------------- arithmetic


# arithmetic names of pamtorch train beyond pamtorch.Config.from_name's, as op kinds made PA
ARITH_NAMES = {
    # the paper's CNN variant: PA convolutions and linear layers (the matmul kind), BatchNorm and
    # everything else exact (epfml/pam README, "TIMM CIFAR10 CNNs": linear_cfg and conv_cfg pam)
    "pam-conv": ("matmul",),
}


def arith_config(arith: str, derivative=None, mantissa_bits=None):
    """The ``pamtorch.Config`` of ``--arith`` (not fp32): ``pam-conv`` or a ``Config.from_name`` name,
    its PA kinds rounded to ``mantissa_bits`` (``Config.with_mantissa_bits``; None: full width)."""
    import pamtorch

    if not (hasattr(pamtorch, "mode") and hasattr(pamtorch, "Config")):
        raise RuntimeError(f"--arith {arith} needs pamtorch.mode and pamtorch.Config, "
                           f"which this pamtorch install does not provide")
    try:
        if arith in ARITH_NAMES:
            cfg = pamtorch.Config.ablation(*ARITH_NAMES[arith])
        else:
            cfg = pamtorch.Config.from_name(arith)
    except ValueError as e:
        raise UserError(f"--arith {arith}: {e} (or fp32, {', '.join(ARITH_NAMES)})") from None
    cfg = _with_derivative(cfg, derivative)
    try:
        return cfg if mantissa_bits is None else cfg.with_mantissa_bits(mantissa_bits)
    except (TypeError, ValueError) as e:
        raise UserError(f"--mantissa-bits {mantissa_bits}: {e}") from None


def arith_context(arith: str, derivative=None, mantissa_bits=None):
    """A factory of context managers that run code in the chosen arithmetic (``arith_config``'s).

    All variants use the math (unfused) attention kernel and no fused transformer fast path, so the
    only difference between them is the arithmetic of the aten ops.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mode_cfg = None if arith == "fp32" else arith_config(arith, derivative, mantissa_bits)

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


def micro_batches(task, batch, n: int) -> list:
    """``batch`` (a tuple of tensors, batch dimension first) split into ``n`` consecutive
    micro-batches for gradient accumulation, or by the task's own ``split(batch, n)`` if it has one."""
    if n == 1:
        return [batch]
    if hasattr(task, "split"):
        return task.split(batch, n)
    return list(zip(*(t.tensor_split(n) for t in batch)))


def accumulate_gradients(task, model, micro: list, ctx, arith: str, ddp: bool = False, poison: bool = False):
    """Forward and backward of each micro-batch in ``micro`` (autograd sums their gradients), then
    each parameter's gradient divided by ``n = len(micro)``: g = (g_1 + ... + g_n) ÷ n, the PA
    division ``pamtorch.div`` unless ``arith`` is fp32 (as the data-parallel average; exact for n a
    power of two). Each micro-batch's mean loss counts equally, so in fp32 a step equals one on the
    n micro-batches together up to float summation order when they hold equally many items. Under
    DDP (``ddp``) the gradients are all-reduced at the last backward only. ``poison`` adds a NaN to
    the loss (the tests' --debug-nan-at). Returns (mean loss, a float32 tensor; items)."""
    losses, n_items = [], 0
    for k, mb in enumerate(micro):
        sync = not ddp or k == len(micro) - 1
        with ctx(), (contextlib.nullcontext() if sync else model.no_sync()):
            loss, n = task.loss(model, mb)
            if poison:
                loss = loss + float("nan")
            loss.backward()
        losses.append(loss.detach().float().reshape(()))
        n_items += n
    if len(micro) > 1:
        for p in model.parameters():
            if p.grad is not None:
                p.grad = pa_divide(p.grad, len(micro), arith)
    return torch.stack(losses).sum() / len(micro), n_items


def count_macs(task, model, batch) -> int:
    """Multiply-accumulates of one training step (forward + backward) in matmuls, convolutions and
    attention, counted by torch's FlopCounterMode on one batch (2 flops = 1 MAC). The model's
    buffers (BatchNorm's running statistics) and the random state are left as they were."""
    from torch.utils.flop_counter import FlopCounterMode

    from torch.nn.attention import SDPBackend, sdpa_kernel

    counter = FlopCounterMode(display=False)
    rng = torch.get_rng_state()
    buffers = [(b, b.clone()) for b in model.buffers()]
    with counter, sdpa_kernel(SDPBackend.MATH):
        loss, _ = task.loss(model, batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
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
    p.add_argument("--preset", help="model and training preset (vit: tiny, deit-tiny; cnn: resnet20, resnet110, vgg, "
                                    "vgg13; translate: tiny, small, iwslt; lm: tiny, small); the values and their sources "
                                    "are listed above")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field, e.g. --set depth=2 (repeatable)")
    p.add_argument("--arith", default="fp32",
                   help="fp32 (stock PyTorch), pam-conv (PA matrix products and convolutions, the rest exact: "
                        "the paper's CNN variant) or a pamtorch config preset: pam-matmul, pam-full, paper")
    p.add_argument("--derivative", type=DERIVATIVE, default=None, metavar="{approx,exact,paper,KIND=D,...}",
                   help="derivative of the PA operations: approx or exact for every PA kind, paper (the "
                        "preset's own, the default), or per kind, e.g. matmul=exact or softmax=exact,loss=exact "
                        "(the paper's derivative ablations); loss=balanced makes the loss's approx "
                        "derivative sum to zero per row (docs/nn.md)")
    p.add_argument("--mantissa-bits", type=MANTISSA_BITS, default=None, metavar="K",
                   help="round the operands and results of every PA op to K mantissa bits, 1-23 "
                        "(Config.with_mantissa_bits; 7: bfloat16's width; default: float32's 23); "
                        "fp32 is not rounded")
    p.add_argument("--compare", nargs="?", const=DEFAULT_COMPARE, default=None, metavar="A,B,...",
                   help=f"train several arithmetic variants with the same seed and data order "
                        f"(default {DEFAULT_COMPARE}) and write a comparison table")
    p.add_argument("--data", default=None,
                   help="vit: digits (built-in), mnist, cifar10, imagefolder; translate: toy (built-in) or "
                        "parallel; lm: sklearn-docs (built-in) or text. Guessed from --data-dir if omitted")
    p.add_argument("--data-dir", default=None, help="folder (or file for lm) with the data")
    p.add_argument("--steps", type=POSITIVE_INT, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=POSITIVE, default=None, help="passes over the training data")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=None,
                   help="global batch size (all processes together) of one forward/backward pass")
    p.add_argument("--accum", type=POSITIVE_INT, default=1,
                   help="gradient accumulation: each optimizer step averages the gradients of this many batches "
                        "(an effective batch of accum x batch size)")
    p.add_argument("--max-tokens", type=POSITIVE_INT, default=None,
                   help="translate: batches built by token count: at most this many (padded) tokens per batch, "
                        "instead of --batch-size sentences")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default=None,
                   help="AdamW, or SGD with Nesterov momentum 0.9 (default: the recipe's; cnn: sgd)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="vit, cnn: light augmentation (random crop with padding side/8, horizontal flip); "
                        "default: on for cifar10 in cnn and in the deit-tiny preset")
    p.add_argument("--lr", type=POSITIVE, default=None, help="peak learning rate")
    p.add_argument("--min-lr", type=NON_NEGATIVE, default=None,
                   help="learning rate at the end of the cosine (default 0, or the preset's)")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=None,
                   help="warmup steps (< 1: fraction of the steps; default: the recipe's or preset's)")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=None)
    p.add_argument("--label-smoothing", type=PROBABILITY, default=None)
    p.add_argument("--smoothing", choices=["torch", "fairseq"], default=None,
                   help="how --label-smoothing ε is spread: torch's ε/C over all C classes, or fairseq's "
                        "ε/(C-1) over the other classes (the paper's IWSLT runs); default: the preset's, else torch")
    p.add_argument("--clip", type=NON_NEGATIVE, default=None, help="max gradient norm (0: no clipping)")
    p.add_argument("--dropout", type=PROBABILITY, default=None, help="override the preset's dropout")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--out", default=None, help="output folder (default runs/RECIPE-ARITH)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run that --out holds")
    p.add_argument("--allow-changes", action="store_true",
                   help="--resume with settings that differ from the checkpoint's (recorded in changes.jsonl)")
    p.add_argument("--eval-arith", choices=["same", "exact"], default="same",
                   help="evaluation and decoding in the training arithmetic (same) or in standard float "
                        "arithmetic (exact, as the paper's released code decodes)")
    p.add_argument("--eval-every", type=POSITIVE_INT, default=None,
                   help="steps between evaluations (default: 10 per run)")
    p.add_argument("--ckpt-every", type=POSITIVE_INT, default=None,
                   help="steps between checkpoints (default: --eval-every)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--src", default="de", help="translate: source language suffix")
    p.add_argument("--tgt", default="en", help="translate: target language suffix")
    p.add_argument("--beam", type=POSITIVE_INT, default=5, help="translate: beam size for BLEU")
    p.add_argument("--eval-sentences", type=POSITIVE_INT, default=500,
                   help="translate: sentences translated for BLEU")
    p.add_argument("--vocab-size", type=POSITIVE_INT, default=None, help="BPE vocabulary size")
    p.add_argument("--tokenizer", choices=["char", "bpe"], default="char", help="lm: characters or BPE")
    add_debug_argument(p)
    # for tests: stop as if interrupted after this step / inject a NaN loss at this step
    p.add_argument("--stop-at", type=POSITIVE_INT, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug-nan-at", type=POSITIVE_INT, default=None, help=argparse.SUPPRESS)


def add_debug_argument(p, default=argparse.SUPPRESS):
    """``--debug``: a full traceback instead of the one-line error. A subcommand's flag defaults to
    SUPPRESS so that it does not undo ``pamtorch --debug COMMAND``."""
    p.add_argument("--debug", action="store_true", default=default,
                   help="show the full traceback of an error instead of one line")


def add_train_parser(subparsers):
    """Register ``train`` on the pamtorch CLI's subparsers."""
    p = subparsers.add_parser("train", help="train a recipe model (vit, cnn, translate, lm)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run_train)
    return p


def _parse_value(key, text, current):
    """``--set KEY=TEXT`` as the type of the field's current value."""
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "0", "false", "no"):
            return text.lower() in ("1", "true", "yes")
        raise UserError(f"--set {key}={text}: expected true or false")
    try:
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            v = float(text)
            if math.isfinite(v):
                return v
            raise ValueError
    except ValueError:
        raise UserError(f"--set {key}={text}: expected {'an integer' if isinstance(current, int) else 'a number'}") \
            from None
    return text


def resolve_hparams(args, recipe):
    """The model config and training settings of a run: the command line's, else the preset's
    (``recipe.PRESET_TRAINING``), else the recipe's ``DEFAULTS``."""
    preset = args.preset or recipe.DEFAULTS["preset"]
    if preset not in recipe.PRESETS:
        raise UserError(f"--preset {preset}: unknown preset for {args.recipe} (expected one of "
                        f"{', '.join(recipe.PRESETS)})")
    d = {**recipe.DEFAULTS, **getattr(recipe, "PRESET_TRAINING", {}).get(preset, {})}
    cfg = recipe.PRESETS[preset]
    fields = [f.name for f in dataclasses.fields(cfg)]
    overrides = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"--set {item}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        if key not in fields:
            raise UserError(f"--set {item}: {type(cfg).__name__} has no field '{key}' (expected one of "
                            f"{', '.join(fields)})")
        overrides[key] = _parse_value(key, value, getattr(cfg, key))
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    cfg = dataclasses.replace(cfg, **overrides).check()

    def pick(name, default=None):
        v = getattr(args, name, None)
        return d.get(name, default) if v is None else v

    max_tokens, augment = getattr(args, "max_tokens", None), getattr(args, "augment", None)
    if max_tokens is not None and args.recipe != "translate":
        raise UserError(f"--max-tokens {max_tokens}: only the translate recipe batches by tokens (use --batch-size)")
    if max_tokens is not None and args.batch_size is not None:
        raise UserError(f"--max-tokens {max_tokens} --batch-size {args.batch_size}: give one (a batch is a token "
                        f"budget or a number of sentences)")
    if max_tokens is None and args.batch_size is None:
        max_tokens = d.get("max_tokens")  # the preset's token batching, unless --batch-size replaces it
    if augment is not None and args.recipe not in IMAGE_RECIPES:
        raise UserError(f"--{'' if augment else 'no-'}augment: only the image recipes ({', '.join(IMAGE_RECIPES)}) "
                        f"augment their data")
    return SimpleNamespace(preset=preset, model_config=cfg, lr=pick("lr"), batch_size=pick("batch_size"),
                           weight_decay=pick("weight_decay"), warmup=pick("warmup"),
                           # a warmup in epochs (the preset's) unless --warmup gives it in steps
                           warmup_epochs=d.get("warmup_epochs") if getattr(args, "warmup", None) is None else None,
                           min_lr=pick("min_lr", 0.0), label_smoothing=pick("label_smoothing"),
                           smoothing=pick("smoothing", "torch"), clip=pick("clip"),
                           betas=tuple(d.get("betas", (0.9, 0.999))), optimizer=pick("optimizer", "adamw"),
                           momentum=d.get("momentum", 0.9), accum=getattr(args, "accum", None) or 1,
                           max_tokens=max_tokens, augment=augment if augment is not None else d.get("augment"),
                           extra=d)


def lr_at(step, total, base, warmup, min_lr=0.0):
    """Linear warmup to ``base`` over ``warmup`` steps, then cosine decay to ``min_lr``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (base - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------- files


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save through ``atomic_write`` (never a partial file; a failed write is one clear line)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


def read_jsonl(path: Path, torn: list = None):
    """The rows of a JSONL log. A last line that is not valid JSON (a write cut short by a crash,
    power loss or a full disk) is left out and appended to ``torn`` if given; any other bad line
    is a UserError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from e
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as e:
            if i == len(lines) - 1:
                if torn is not None:
                    torn.append(line)
                break
            raise UserError(f"{path}: line {i + 1} is not a log row ({e}); delete the damaged lines or use "
                            f"--overwrite") from None
        rows.append(row)
    return rows


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the rows up to ``last_step`` (the checkpoint's) and drop a torn last line, saying so."""
    torn = []
    rows = [r for r in read_jsonl(path, torn) if r["step"] <= last_step]
    if torn:
        print(f"{path}: dropped a torn last line ({torn[0][:60]!r}...)", file=sys.stderr)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _append_line(f, path: Path, row: dict) -> None:
    try:
        f.write(json.dumps(row) + "\n")
        f.flush()
    except OSError as e:
        raise UserError(f"{path}: write failed ({e.strerror}); free disk space or choose another --out") from e


def non_finite(named_tensors):
    """The name of the first floating tensor with a NaN or infinity, or None (one sync for all)."""
    named = [(n, t) for n, t in named_tensors if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if not named or bool(torch.stack([t.detach().isfinite().all() for _, t in named]).all()):
        return None
    return next(n for n, t in named if not bool(t.detach().isfinite().all()))


def _optimizer_tensors(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        for k, v in state.items():
            yield f"optimizer {k} of {names.get(id(p), '?')}", v


def _model_and_optimizer_tensors(model, optimizer):
    yield from model.state_dict().items()
    yield from _optimizer_tensors(model, optimizer)


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise UserError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} available); "
                        f"use --device cpu or auto")
    return device


def _make_out(out: Path) -> None:
    """Create ``out`` and make sure a file can be written there (one clear line if not)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror}); choose a writable folder") from e


def _remove_stale_temp_files(out: Path, names) -> None:
    for p in stale_temp_files(out, names):
        p.unlink(missing_ok=True)
        print(f"removed {p}, left by an interrupted write", file=sys.stderr)


def _refuse_held_run(args, out: Path) -> None:
    held = [n for n in RUN_FILES[:4] if (out / n).exists()]
    if held and not args.resume and not args.overwrite:
        raise UserError(f"--out {out} holds a run ({', '.join(held)}): add --resume to continue it, --overwrite "
                        f"to replace it, or choose another --out")


def prepare_out(args, out: Path, rank: int, world: int) -> bool:
    """Make ``out`` ready for this run and say whether it resumes. Stale temporary files are removed;
    an ``out`` that holds a run needs --resume (continue) or --overwrite (its files are removed)."""
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other: continue the run in --out or replace it")
    _make_out(out)
    _refuse_held_run(args, out)
    ckpt_path = out / "checkpoint.pt"
    resume = bool(args.resume and ckpt_path.is_file())
    if rank == 0:
        _remove_stale_temp_files(out, RUN_FILES)
        if args.resume and not resume:
            print(f"--resume: no checkpoint at {ckpt_path}, starting from scratch", file=sys.stderr)
        if not resume:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
    if world > 1:  # no rank writes into out before rank 0 has cleaned it
        import torch.distributed as dist

        dist.barrier()
    return resume


def _settings(args, arith, hp, task, total, warmup) -> dict:
    """What a run was trained with; --resume compares them with the checkpoint's."""
    derivatives = None
    if arith != "fp32":
        from pamtorch.config import KINDS

        cfg = arith_config(arith, args.derivative, args.mantissa_bits)
        derivatives = {k: cfg.kind(k).derivative for k in KINDS if cfg.kind(k).pa}
    s = {"recipe": args.recipe, "preset": hp.preset, "model_config": dataclasses.asdict(task.cfg),
         "arith": arith, "derivatives": derivatives, "seed": args.seed, "batch_size": hp.batch_size,
         "data": args.data, "data_dir": None if args.data_dir is None else str(Path(args.data_dir).resolve()),
         "steps": total, "lr": hp.lr, "min_lr": hp.min_lr, "warmup_steps": warmup,
         "weight_decay": hp.weight_decay, "label_smoothing": hp.label_smoothing, "clip": hp.clip,
         "optimizer": hp.optimizer, **({"momentum": hp.momentum} if hp.optimizer == "sgd" else {"betas": list(hp.betas)}),
         "accum": hp.accum, "eval_arith": args.eval_arith,
         "mantissa_bits": None if arith == "fp32" else args.mantissa_bits}
    s.update(smoothing=hp.smoothing)
    if args.recipe in IMAGE_RECIPES:
        s.update(augment=task.augment)
    if args.recipe == "translate":
        s.update(src=args.src, tgt=args.tgt, vocab_size=args.vocab_size, max_tokens=hp.max_tokens)
    if args.recipe == "lm":
        s.update(tokenizer=args.tokenizer, vocab_size=args.vocab_size)
    return s


# settings added to the record later, with the value every earlier run had
SETTINGS_BEFORE_RECORDED = {"smoothing": "torch"}
# settings the checkpoint itself fixes: the model it holds and the tokenizer.json kept with it
FIXED_SETTINGS = ("recipe", "preset", "model_config", "tokenizer", "vocab_size")
CHECKPOINT_KEYS = {"model": dict, "optimizer": dict, "step": int, "rng_cpu": torch.Tensor, "meta": dict}


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path``, checked: a truncated or foreign file, a missing key or a
    non-finite tensor is a UserError naming the file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a damaged file: all mean "unreadable"
        raise UserError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else 'empty'}); it may be truncated. "
                        f"Use --overwrite to start the run again") from e
    if not isinstance(ckpt, dict):
        raise UserError(f"--resume: {path} holds a {type(ckpt).__name__}, not a pamtorch train checkpoint")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    wrong = [k for k, t in CHECKPOINT_KEYS.items() if k in ckpt and not isinstance(ckpt[k], t)]
    if missing or wrong:
        raise UserError(f"--resume: {path} is not a pamtorch train checkpoint (missing keys: {missing or 'none'}; "
                        f"wrong types: {wrong or 'none'}; expected {', '.join(CHECKPOINT_KEYS)})")
    bad = non_finite(list(ckpt["model"].items()))
    if bad is not None:
        raise UserError(f"--resume: {path} holds non-finite values in {bad}; use --overwrite to start again")
    return ckpt


def _compare_settings(ckpt_path: Path, stored: dict, settings: dict, allow: bool) -> dict:
    """The settings that differ from the checkpoint's, as {key: [old, new]}; refuse them unless
    ``allow`` (never those the checkpoint fixes). Keys an older checkpoint did not store are
    skipped, or compared with the value every run had before they were recorded."""
    stored = {**SETTINGS_BEFORE_RECORDED, **stored}
    changed = {k: [stored[k], v] for k, v in settings.items() if k in stored and _jsonable(stored[k]) != _jsonable(v)}
    fixed = {k: v for k, v in changed.items() if k in FIXED_SETTINGS}
    if fixed:
        k, (old, new) = next(iter(fixed.items()))
        raise UserError(f"--resume: {ckpt_path} was written with {k}={old!r}, this run has {k}={new!r}; the "
                        f"checkpoint fixes {k} (use another --out, or --overwrite to start again)")
    if changed and not allow:
        raise UserError(f"--resume: this run changes {_show_changes(changed)} from the settings {ckpt_path} was "
                        f"written with; resume with the same settings, or add --allow-changes to continue with "
                        f"the new ones (recorded in changes.jsonl)")
    return changed


def _show_changes(changed: dict) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())


def train_one(args, arith: str, out: Path, show_progress: bool = True) -> dict:
    """Train one arithmetic variant into ``out``; returns the final metrics (also in metrics.json)."""
    import torch.distributed as dist

    rank, world = _dist_info()
    recipe = get_recipe(args.recipe)
    hp = resolve_hparams(args, recipe)
    if hp.max_tokens is None and hp.batch_size % world:
        raise UserError(f"--batch-size {hp.batch_size} must be divisible by the {world} processes")
    if hp.min_lr > hp.lr:
        raise UserError(f"--min-lr {hp.min_lr} is above the peak learning rate {hp.lr} (--lr)")
    device = resolve_device(args.device)
    if arith == "fp32" and args.mantissa_bits is not None and not args.compare:
        raise UserError(f"--mantissa-bits {args.mantissa_bits} rounds piecewise affine ops; --arith fp32 has none "
                        f"(choose a PA --arith)")
    ctx = arith_context(arith, args.derivative, args.mantissa_bits)  # fails early if the arithmetic is unavailable
    eval_ctx = ctx if args.eval_arith == "same" else arith_context("fp32")
    ckpt_path = out / "checkpoint.pt"
    resume = prepare_out(args, out, rank, world)

    torch.manual_seed(args.seed)
    task = recipe.Task(args, hp, out, device)
    model = task.model.to(device)
    raw_model = model
    n_params = sum(p.numel() for p in model.parameters())
    spe = task.steps_per_epoch(hp.batch_size * hp.accum)
    if args.steps is not None:
        total = args.steps
    elif args.epochs is not None:
        total = max(1, int(round(args.epochs * spe)))
    elif "steps" in hp.extra:  # the recipe's or preset's run length
        total = hp.extra["steps"]
    else:
        total = max(1, int(round(hp.extra["epochs"] * spe)))
    if hp.warmup_epochs is not None:
        warmup = int(round(hp.warmup_epochs * spe))
    else:
        warmup = int(hp.warmup * total) if hp.warmup < 1 else int(hp.warmup)
    eval_every = args.eval_every or max(1, total // 10)
    ckpt_every = args.ckpt_every or eval_every

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith(("pos_embed", "cls_token"))]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.endswith(("pos_embed", "cls_token")))]
    groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if hp.optimizer == "sgd":  # timm's "sgd", which the paper's CNN commands use, has Nesterov momentum
        optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.momentum > 0)
    else:
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=hp.betas)

    settings = _settings(args, arith, hp, task, total, warmup)
    meta = {**settings, "derivative": args.derivative}
    start, ckpt_step = 0, None
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        changed = _compare_settings(ckpt_path, ckpt["meta"], settings, args.allow_changes)
        try:
            raw_model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["rng_cpu"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--resume: {ckpt_path} does not fit this model ({' '.join(str(e).split())[:300]}); "
                            f"use --overwrite to start again") from e
        start = ckpt_step = ckpt["step"]
        if start > total:
            raise UserError(f"--resume: {ckpt_path} is at step {start}, past this run's {total} steps (--steps)")
        if torch.cuda.is_available() and ckpt.get("rng_cuda"):
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
        if rank == 0:
            _truncate_jsonl(out / "train_log.jsonl", start)
            # a finished run's final evaluation is redone on resume (it may have been interrupted)
            _truncate_jsonl(out / "eval_log.jsonl", start - 1 if start == total else start)
            if changed:
                with open(out / "changes.jsonl", "a") as f:
                    _append_line(f, out / "changes.jsonl", {"step": start, "changes": _jsonable(changed)})
                print(f"--allow-changes: continuing at step {start} with {_show_changes(changed)} "
                      f"(recorded in {out / 'changes.jsonl'})", file=sys.stderr)
            print(f"resumed from {ckpt_path} at step {start}", file=sys.stderr)

    macs = count_macs(task, raw_model, micro_batches(task, task.batch(0, hp.batch_size * hp.accum, args.seed),
                                                     hp.accum)[0]) * hp.accum if rank == 0 else 0
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        model.register_comm_hook(None, make_allreduce_hook(arith))

    def save_checkpoint(step):
        nonlocal ckpt_step
        bad = non_finite(_model_and_optimizer_tensors(raw_model, optimizer))
        if bad is not None:  # never replace the last good checkpoint with a diverged state
            raise NonFiniteLoss(f"non-finite values in {bad} at step {step}")
        if rank == 0:
            atomic_torch_save({
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "meta": meta,
            }, ckpt_path)
        ckpt_step = step
        if world > 1:
            dist.barrier()

    def evaluate(step, final=False):
        with eval_ctx():
            m = task.evaluate(raw_model, final=final)
        m = {"step": step, **m}
        if rank == 0:
            with open(out / "eval_log.jsonl", "a") as f:
                _append_line(f, out / "eval_log.jsonl", {k: v for k, v in m.items() if k != "examples"})
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
            lr = lr_at(step, total, hp.lr, warmup, hp.min_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            micro = micro_batches(task, task.batch(step, hp.batch_size * hp.accum, args.seed, rank, world), hp.accum)
            # dropout randomness: a pure function of (seed, step, rank), so --resume is exact
            torch.manual_seed((args.seed * 1_000_003 + step) * 64 + rank)
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_value, n_items = accumulate_gradients(
                task, model, micro, ctx, arith, world > 1,
                poison=args.debug_nan_at is not None and step + 1 == args.debug_nan_at)
            loss_value = loss_value.reshape(1)
            if world > 1:  # for the log and the finiteness check only (division in Python)
                dist.all_reduce(loss_value, op=dist.ReduceOp.SUM)
            loss_value = loss_value.item() / world
            if not math.isfinite(loss_value):
                raise NonFiniteLoss(f"non-finite loss ({loss_value}) at step {step + 1}")
            with ctx():
                if hp.clip and hp.clip > 0:
                    gnorm = torch.nn.utils.clip_grad_norm_(params, hp.clip)
                else:
                    gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                gnorm = float(gnorm)
                if not math.isfinite(gnorm):
                    raise NonFiniteLoss(f"non-finite gradient norm ({gnorm}) at step {step + 1}")
                try:
                    optimizer.step()
                except RuntimeError as e:  # AdamW's step size lr / (1 - beta1^t) overflows the dtype
                    if "overflow" not in str(e):
                        raise
                    raise NonFiniteLoss(f"the optimizer step overflowed at step {step + 1} (learning rate {lr:g}: "
                                        f"{' '.join(str(e).split())})") from e
            bad = non_finite([(n, p) for n, p in raw_model.named_parameters()])
            if bad is not None:
                raise NonFiniteLoss(f"non-finite parameter {bad} after the optimizer step at step {step + 1} "
                                    f"(learning rate {lr:g})")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            step_times.append(dt)
            row = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": gnorm, "step_time": dt,
                   f"{task.unit}_per_s": n_items * world / dt}
            if log is not None:
                _append_line(log, out / "train_log.jsonl", row)
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
        raise NonFiniteLoss(f"training diverged ({arith}): {e}; stopping. " + (
            f"The last good checkpoint is {ckpt_path} (step {ckpt_step})" if ckpt_step is not None
            else "No checkpoint was written")) from None
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
    changes = read_jsonl(out / "changes.jsonl")
    metrics = {
        **meta, "steps": total, "steps_done": train_rows[-1]["step"] if train_rows else start,
        "completed": bool(train_rows) and train_rows[-1]["step"] == total,
        "params": n_params, "world_size": world, "device": str(device),
        **({"setting_changes": changes} if changes else {}),
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
    rank, world = _dist_info()
    names = [n.strip() for n in args.compare.split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise UserError(f"--compare {args.compare}: expected distinct arithmetic names separated by commas "
                        f"(e.g. {DEFAULT_COMPARE})")
    for name in names:  # every mistake is found before the first variant trains
        try:
            arith_context(name, args.derivative, args.mantissa_bits)
        except (RuntimeError, ImportError, AttributeError):
            pass  # the arithmetic is unavailable in this install: that variant's row says so
        _refuse_held_run(args, out / name)
    _make_out(out)
    if rank == 0:
        _remove_stale_temp_files(out, COMPARE_FILES)
    results = {}
    for name in names:
        try:
            results[name] = train_one(args, name, out / name)
        except (NonFiniteLoss, RuntimeError, ImportError, AttributeError) as e:
            results[name] = {"error": str(e).splitlines()[0][:300]}
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
    """``python -m pamtorch.recipes.train``: ``pamtorch train`` with the same one-line errors."""
    p = ArgumentParser(prog="python -m pamtorch.recipes.train", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    args.debug = getattr(args, "debug", False)
    return report_errors(run_train, args)


if __name__ == "__main__":
    sys.exit(main())
