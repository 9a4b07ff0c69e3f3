"""The proof: record one training step and report every float multiplication that ran.

``pamtorch.audit(step_fn, *args)`` runs ``step_fn(*args)`` (forward, backward and
optimizer step, typically under ``pamtorch.mode``) inside a recording dispatch mode that
sits outside the PA mode, so it sees exactly what executes:

* ops the PA mode routed to piecewise affine implementations (it is told of each);
* every other aten op, classified with the same table the mode uses
  (``pamtorch.mode.classify``): a "routable" or "unknown" float op reaching the recorder
  ran with real float multiplications.

Phases: "optimizer" inside ``Optimizer.step``, "backward" while the autograd engine runs
a node, "forward" otherwise. Forward ops are attributed to module paths.

The energy estimate uses the paper's Table 4 (Horowitz, 45 nm): fp32 multiply 3.7 pJ,
fp32 add 0.9 pJ, int32 add 0.1 pJ. Each multiply-like op is counted by its number of
scalar multiplications (M·N·K for a matrix product, one per output element for
elementwise ops); a matrix product also pays one fp32 add per multiplication. A PA
multiplication costs an int32 add, an exact one an fp32 multiply. Additions elsewhere,
memory traffic and control are left out: it is an estimate of arithmetic energy only.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from .mode import RECORDERS, classify, op_kind

__all__ = ["audit", "error_report", "AuditReport", "MultiplicationFoundError", "ENERGY_PJ"]

ENERGY_PJ = {"fp32_mul": 3.7, "fp32_add": 0.9, "int32_add": 0.1}
PHASES = ("forward", "backward", "optimizer")
aten = torch.ops.aten
_MATMUL_KIND = "matmul"


class MultiplicationFoundError(AssertionError):
    """Raised by ``AuditReport.assert_multiplication_free``."""


def _numel(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, (list, tuple)):
        return sum(_numel(t) for t in x)
    return 0


def multiplications(func, args, out) -> int:
    """Scalar multiplications an op performs in exact arithmetic (an estimate for
    elementwise ops: one per output element)."""
    p = func.overloadpacket
    if p in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.mv, aten.dot):
        a, b = (args[1], args[2]) if p in (aten.addmm, aten.baddbmm) else (args[0], args[1])
        k = a.shape[-1]
        return _numel(out) * k
    if p is aten.convolution:
        w = args[1]  # [OC, C/groups, kh, kw]: each output sums C/groups·kh·kw products
        return _numel(out) * (w.shape[1] * math.prod(w.shape[2:]))
    if p is aten.convolution_backward:
        w = args[2]
        per = w.shape[1] * math.prod(w.shape[2:])
        return 2 * _numel(args[0]) * per
    if p in (aten.mean,):
        return _numel(out)
    return max(_numel(out), 1)


@dataclass
class AuditReport:
    """What one audited step ran. ``outside[phase]`` counts float multiply-like ops that ran
    with real multiplications, ``pa[phase]`` the ops routed to PA; ``modules[(phase, op)]``
    the module paths they ran in."""

    outside: dict = field(default_factory=lambda: {p: Counter() for p in PHASES})
    pa: dict = field(default_factory=lambda: {p: Counter() for p in PHASES})
    modules: dict = field(default_factory=lambda: defaultdict(set))
    mults_pa: dict = field(default_factory=lambda: Counter())      # by kind: matmul / other
    mults_exact: dict = field(default_factory=lambda: Counter())

    def multiplication_free(self) -> bool:
        return not any(self.outside[p] for p in PHASES)

    def assert_multiplication_free(self) -> None:
        """Raise ``MultiplicationFoundError`` naming every float multiply-like op that ran."""
        if self.multiplication_free():
            return
        lines = [f"{phase}: {op} x{n} in {', '.join(sorted(self.modules[(phase, op)])) or '?'}"
                 for phase in PHASES for op, n in sorted(self.outside[phase].items())]
        raise MultiplicationFoundError("float multiplications ran outside PA:\n  " + "\n  ".join(lines))

    # energy ---------------------------------------------------------------------
    def energy_pj(self) -> dict:
        """Arithmetic energy of the step as run, and of the same step in exact fp32."""
        e = ENERGY_PJ
        mm_pa, other_pa = self.mults_pa["matmul"], self.mults_pa["other"]
        mm_ex, other_ex = self.mults_exact["matmul"], self.mults_exact["other"]
        as_run = (mm_pa * (e["int32_add"] + e["fp32_add"]) + other_pa * e["int32_add"]
                  + mm_ex * (e["fp32_mul"] + e["fp32_add"]) + other_ex * e["fp32_mul"])
        mm, other = mm_pa + mm_ex, other_pa + other_ex
        exact = mm * (e["fp32_mul"] + e["fp32_add"]) + other * e["fp32_mul"]
        return {"as_run": as_run, "exact": exact, "ratio": as_run / exact if exact else float("nan")}

    def __str__(self) -> str:
        rows = ["| phase | op | PA | outside PA (float multiplications) | modules |",
                "|---|---|---:|---:|---|"]
        for phase in PHASES:
            ops = sorted(set(self.pa[phase]) | set(self.outside[phase]))
            for op in ops:
                mods = ", ".join(sorted(self.modules[(phase, op)])[:3])
                rows.append(f"| {phase} | {op} | {self.pa[phase][op]} | {self.outside[phase][op]} | {mods} |")
        en = self.energy_pj()
        verdict = "multiplication-free" if self.multiplication_free() else \
            f"NOT multiplication-free: {sum(sum(c.values()) for c in self.outside.values())} float multiply-like op calls"
        rows.append("")
        rows.append(f"verdict: {verdict}")
        rows.append(f"arithmetic energy estimate (Horowitz 45 nm): {en['as_run'] / 1e6:.3f} uJ as run, "
                    f"{en['exact'] / 1e6:.3f} uJ in exact fp32 ({en['ratio']:.1%})")
        return "\n".join(rows)


class _Recorder(TorchDispatchMode):
    def __init__(self, report: AuditReport, names: dict):
        super().__init__()
        self.report = report
        self.names = names
        self.stack: list[str] = []
        self.optimizer_depth = 0

    # phase and place ---------------------------------------------------------------
    def phase(self) -> str:
        if self.optimizer_depth:
            return "optimizer"
        if torch._C._current_autograd_node() is not None:
            return "backward"
        return "forward"

    def place(self, phase: str) -> str:
        if phase == "backward":
            node = torch._C._current_autograd_node()
            return node.name() if node is not None else "?"
        if phase == "optimizer":
            return "optimizer.step"
        return self.stack[-1] if self.stack else "(top level)"

    def _note(self, counter_name: str, func, args, out):
        phase = self.phase()
        op = str(func.overloadpacket.__name__)
        getattr(self.report, counter_name)[phase][op] += 1
        self.report.modules[(phase, op)].add(self.place(phase))
        n = multiplications(func, args, out)
        kind = "matmul" if op_kind(func) == _MATMUL_KIND else "other"
        (self.report.mults_pa if counter_name == "pa" else self.report.mults_exact)[kind] += n

    # hooks ---------------------------------------------------------------------------
    def routed(self, func, args, kwargs, out):
        self._note("pa", func, args, out)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if classify(func, args, kwargs) != "free":
            self._note("outside", func, args, out)
        return out

    def module_pre(self, module, args):
        self.stack.append(self.names.get(id(module), type(module).__name__))

    def module_post(self, module, args, out):
        if self.stack:
            self.stack.pop()


def _module_names(args, model) -> dict:
    roots = [model] if model is not None else [a for a in args if isinstance(a, torch.nn.Module)]
    names = {}
    for root in roots:
        for name, m in root.named_modules():
            names.setdefault(id(m), name or type(root).__name__)
    return names


def audit(step_fn, *args, model: torch.nn.Module | None = None, **kwargs) -> AuditReport:
    """Run ``step_fn(*args, **kwargs)`` once under a recording mode; return the report.

    Module paths come from ``model`` or from the ``nn.Module`` arguments of ``step_fn``.
    Print the report for a table; ``report.assert_multiplication_free()`` raises if any
    float multiply-like op ran outside PA."""
    report = AuditReport()
    rec = _Recorder(report, _module_names(args, model))
    hooks = [
        torch.nn.modules.module.register_module_forward_pre_hook(rec.module_pre),
        torch.nn.modules.module.register_module_forward_hook(rec.module_post),
        register_optimizer_step_pre_hook(lambda *a: setattr(rec, "optimizer_depth", rec.optimizer_depth + 1)),
        register_optimizer_step_post_hook(lambda *a: setattr(rec, "optimizer_depth", rec.optimizer_depth - 1)),
    ]
    RECORDERS.append(rec)
    try:
        with rec:
            step_fn(*args, **kwargs)
    finally:
        RECORDERS.remove(rec)
        for h in hooks:
            h.remove()
    return report


def error_report(model: torch.nn.Module, batch, config=None) -> list[dict]:
    """Per-layer SQNR in dB of the model run PA (under ``pamtorch.mode(config)``) against
    the same model run exact, on ``batch`` (a tensor or a tuple of positional arguments).

    SQNR = 10 log10(Σ ref² / Σ (pa − ref)²), over each leaf module's output; the PA run
    feeds each layer its own PA inputs, so errors accumulate as they would in training.
    This is a diagnostic: it uses ordinary float arithmetic to compare."""
    from .mode import mode

    args = batch if isinstance(batch, tuple) else (batch,)
    outputs: dict = {"exact": {}, "pa": {}}
    which = ["exact"]
    hooks = []
    for name, m in model.named_modules():
        if name and not list(m.children()):
            def hook(mod, inp, out, name=name):
                if isinstance(out, tuple):
                    out = out[0]
                if isinstance(out, torch.Tensor) and out.is_floating_point():
                    outputs[which[0]][name] = out.detach().double()
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            ref = model(*args)
            which[0] = "pa"
            with mode(config):
                got = model(*args)
    finally:
        for h in hooks:
            h.remove()
    outputs["exact"]["(output)"] = ref.detach().double() if isinstance(ref, torch.Tensor) else None
    outputs["pa"]["(output)"] = got.detach().double() if isinstance(got, torch.Tensor) else None
    rows = []
    for name, r in outputs["exact"].items():
        p = outputs["pa"].get(name)
        if r is None or p is None or p.shape != r.shape:
            continue
        noise = ((p - r) ** 2).sum().item()
        signal = (r ** 2).sum().item()
        sqnr = float("inf") if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else float("-inf")
        rows.append({"layer": name, "sqnr_db": sqnr, "numel": r.numel()})
    return rows
