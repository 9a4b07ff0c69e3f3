"""The proof: record one training step and report every float multiplication that ran.

``pamtorch.audit(step_fn, *args)`` runs ``step_fn(*args)`` (forward, backward and
optimizer step, typically under ``pamtorch.mode``) inside a recording dispatch mode that
sits outside the PA mode, so it sees exactly what executes:

* ops the PA mode routed to piecewise affine implementations (it is told of each);
* pamtorch's own PA entry points (``pamtorch.arith``'s elementwise ops and the matrix
  product kernels), which report themselves (:mod:`pamtorch.recording`): the
  function-level routes (``F.scaled_dot_product_attention``, the exact-derivative paths),
  ``pamtorch.nn`` modules and direct ``pamtorch.matmul`` calls are PA products too;
* every other aten op, classified with the mode's own rules (``pamtorch.mode.classify``:
  by overload and arguments, complex counted as floating point, integer inputs with a
  float result counted as float arithmetic): a call that is not "free" reaching the
  recorder ran with real float multiplications. It is "left exact by request" when the
  mode ran it exact because ``leave_exact`` (or a kind named there) asked for it, else
  "outside PA". Either makes the step not multiplication-free.

Phases: "optimizer" inside ``Optimizer.step``, "backward" while the autograd engine runs
a node, "forward" otherwise. Forward ops are attributed to module paths, backward ops to
autograd nodes.

The energy estimate uses the paper's Table 4 (Horowitz, 45 nm): fp32 multiply 3.7 pJ,
fp32 add 0.9 pJ, int32 add 0.1 pJ. PA multiplications are counted where they run, by
the entry points (M·N·K for a matrix product, one per output element for elementwise
ops); exact ones are estimated per aten op (M·N·K for a matrix product or a
convolution's products, one per output element otherwise). A matrix product also pays
one fp32 add per multiplication. A PA multiplication costs an int32 add, an exact one an
fp32 multiply. Additions elsewhere, memory traffic and control are left out: it is an
estimate of arithmetic energy only.
"""
from __future__ import annotations

import math
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from .mode import classify, op_kind
from .recording import RECORDERS, by_request

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


def _conv_products(x, w, out, transposed) -> int:
    """Products of a convolution: each output sums C_in/groups·prod(k) of them; a transposed
    one (weight [C_in, C_out/groups, k...]) spreads each input over C_out/groups·prod(k)."""
    per = w.shape[1] * math.prod(w.shape[2:])
    return (_numel(x) if transposed else _numel(out)) * per


def multiplications(func, args, out) -> int:
    """Scalar multiplications an aten op performs in exact arithmetic (an estimate for
    elementwise ops: one per output element)."""
    p = func.overloadpacket
    if p in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.mv, aten.dot):
        a = args[1] if p in (aten.addmm, aten.baddbmm) else args[0]
        return _numel(out) * a.shape[-1]
    if p is aten.convolution:
        return _conv_products(args[0], args[1], out, args[6])
    if p is aten.convolution_backward:
        # each requested gradient (input, weight) takes as many products as the forward
        g, x, w, transposed, mask = args[0], args[1], args[2], args[7], args[10]
        return (int(mask[0]) + int(mask[1])) * _conv_products(x, w, g, transposed)
    if p in (aten._scaled_dot_product_flash_attention_for_cpu,
             aten._scaled_dot_product_flash_attention_for_cpu_backward):
        back = p is aten._scaled_dot_product_flash_attention_for_cpu_backward
        q, k, v = args[1:4] if back else args[:3]
        ls = q.shape[-2] * k.shape[-2] * math.prod(q.shape[:-2])
        e, ev = q.shape[-1], v.shape[-1]
        # scores and out; backward: recomputed scores, dV, dW, dQ, dK
        return ls * (3 * e + 2 * ev) if back else ls * (e + ev)
    return max(_numel(out), 1)


def _by_phase():
    return {p: Counter() for p in PHASES}


@dataclass
class AuditReport:
    """What one audited step ran, per phase: ``pa[phase]`` counts the ops run PA (aten ops
    the mode routed, and ``pamtorch.*`` entry points called outside them),
    ``left_exact[phase]`` the float multiply-like ops run exact because the mode was asked
    to (``leave_exact``), ``outside[phase]`` those that ran exact with no such request.
    ``modules[(phase, op)]``: the module paths (forward) or autograd nodes (backward) they
    ran in. ``mults_pa[phase]`` / ``mults_exact[phase]``: scalar multiplications by kind
    ("matmul" or "other"), PA and exact."""

    outside: dict = field(default_factory=_by_phase)
    left_exact: dict = field(default_factory=_by_phase)
    pa: dict = field(default_factory=_by_phase)
    modules: dict = field(default_factory=lambda: defaultdict(set))
    mults_pa: dict = field(default_factory=_by_phase)
    mults_exact: dict = field(default_factory=_by_phase)

    def multiplication_free(self) -> bool:
        """No float multiplication ran exact, requested or not."""
        return not any(self.outside[p] or self.left_exact[p] for p in PHASES)

    def _lines(self, counters) -> list:
        return [f"{phase}: {op} x{n} in {', '.join(sorted(self.modules[(phase, op)])) or '?'}"
                for phase in PHASES for op, n in sorted(counters[phase].items())]

    def assert_multiplication_free(self) -> None:
        """Raise ``MultiplicationFoundError`` naming every float multiply-like op that ran
        exact: outside PA, and left exact by request."""
        if self.multiplication_free():
            return
        parts = []
        if any(self.outside[p] for p in PHASES):
            parts.append("float multiplications ran outside PA:\n  " + "\n  ".join(self._lines(self.outside)))
        if any(self.left_exact[p] for p in PHASES):
            parts.append("float multiplications left exact by request (pamtorch.mode leave_exact):\n  "
                         + "\n  ".join(self._lines(self.left_exact)))
        raise MultiplicationFoundError("\n".join(parts))

    # energy ---------------------------------------------------------------------
    def energy_pj(self) -> dict:
        """Arithmetic energy of the step as run, and of the same step in exact fp32."""
        e = ENERGY_PJ
        mm_pa = sum(self.mults_pa[p]["matmul"] for p in PHASES)
        other_pa = sum(self.mults_pa[p]["other"] for p in PHASES)
        mm_ex = sum(self.mults_exact[p]["matmul"] for p in PHASES)
        other_ex = sum(self.mults_exact[p]["other"] for p in PHASES)
        as_run = (mm_pa * (e["int32_add"] + e["fp32_add"]) + other_pa * e["int32_add"]
                  + mm_ex * (e["fp32_mul"] + e["fp32_add"]) + other_ex * e["fp32_mul"])
        mm, other = mm_pa + mm_ex, other_pa + other_ex
        exact = mm * (e["fp32_mul"] + e["fp32_add"]) + other * e["fp32_mul"]
        return {"as_run": as_run, "exact": exact, "ratio": as_run / exact if exact else float("nan")}

    def __str__(self) -> str:
        rows = ["| phase | op | PA | left exact by request | outside PA (float multiplications) | modules |",
                "|---|---|---:|---:|---:|---|"]
        for phase in PHASES:
            ops = sorted(set(self.pa[phase]) | set(self.left_exact[phase]) | set(self.outside[phase]))
            for op in ops:
                mods = ", ".join(sorted(self.modules[(phase, op)])[:3])
                rows.append(f"| {phase} | {op} | {self.pa[phase][op]} | {self.left_exact[phase][op]} "
                            f"| {self.outside[phase][op]} | {mods} |")
        en = self.energy_pj()
        outside = sum(sum(c.values()) for c in self.outside.values())
        left = sum(sum(c.values()) for c in self.left_exact.values())
        if self.multiplication_free():
            verdict = "multiplication-free"
        else:
            verdict = (f"NOT multiplication-free: {outside} float multiply-like op calls outside PA, "
                       f"{left} left exact by request")
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
        self.thread = threading.get_ident()

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

    def _note(self, counter: str, op: str, kind: str, n: int):
        phase = self.phase()
        getattr(self.report, counter)[phase][op] += 1
        self.report.modules[(phase, op)].add(self.place(phase))
        (self.report.mults_pa if counter == "pa" else self.report.mults_exact)[phase][kind] += n

    # hooks ---------------------------------------------------------------------------
    def routed(self, func, args, kwargs, out):
        """An aten op the mode ran PA (its multiplications come from :meth:`kernel`)."""
        if threading.get_ident() == self.thread:
            self._note("pa", func.overloadpacket.__name__, "other", 0)

    def kernel(self, name, kind, n, inside):
        """A PA entry point ran ``n`` multiplications; ``inside`` a routed op, which is
        listed itself, else it is listed as ``pamtorch.<name>``."""
        if threading.get_ident() != self.thread:
            return
        if inside:
            self.report.mults_pa[self.phase()][kind] += n
        else:
            self._note("pa", f"pamtorch.{name}", kind, n)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if classify(func, args, kwargs, out=out) != "free":
            kind = "matmul" if op_kind(func) == _MATMUL_KIND else "other"
            self._note("left_exact" if by_request() else "outside", func.overloadpacket.__name__, kind,
                       multiplications(func, args, out))
        return out

    def module_pre(self, module, args):
        if threading.get_ident() == self.thread:
            self.stack.append(self.names.get(id(module), type(module).__name__))

    def module_post(self, module, args, out):
        if threading.get_ident() == self.thread and self.stack:
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
    float multiply-like op ran exact (outside PA, or left exact by request). Enter
    ``pamtorch.mode`` inside ``step_fn``: the recorder must sit outside the mode to see what
    the mode passed on rather than what it was given. What the audit cannot see is in
    docs/training.md."""
    report = AuditReport()
    rec = _Recorder(report, _module_names(args, model))
    hooks = [
        torch.nn.modules.module.register_module_forward_pre_hook(rec.module_pre),
        torch.nn.modules.module.register_module_forward_hook(rec.module_post, always_call=True),
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
