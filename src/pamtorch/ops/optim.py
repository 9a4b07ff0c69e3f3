"""The optimizers' ``_foreach_*`` ops (stock torch.optim, foreach or per-tensor)."""
from __future__ import annotations

import torch

from .. import arith
from .table import implements, aten, pam, pad, scale
from .elementwise import check_ord, norm2


@implements([aten._foreach_norm], "optimizer")
def _pa_foreach_norm(func, args, kwargs, cfg):
    ord_ = args[1] if len(args) > 1 else kwargs.get("ord", 2)
    check_ord(ord_)
    dtype = kwargs.get("dtype")
    return [norm2(t if dtype is None else t.to(dtype)) for t in args[0]]


# ---------------------------------------------------------------------------
# optimizer's foreach ops

def _foreach(fn):
    def impl(func, args, kwargs, cfg):
        lists = [a for a in args if isinstance(a, (list, tuple))]
        n = len(lists[0])
        outs = []
        for i in range(n):
            per = [a[i] if isinstance(a, (list, tuple)) else a for a in args]
            outs.append(fn(per, kwargs, cfg))
        if func.overloadpacket.__name__.endswith("_"):
            for t, o in zip(args[0], outs):
                t.copy_(o)
            return None
        return outs
    return impl


def _fe_scalar(per, i):
    s = per[i]
    return s.item() if isinstance(s, torch.Tensor) and s.dim() == 0 and s.device.type == "cpu" and \
        not isinstance(per[0], torch.Tensor) else s


for _names, _fn in [
    (("_foreach_mul", "_foreach_mul_"), lambda p, kw, c: pam(p[0], p[1], c)),
    (("_foreach_div", "_foreach_div_"), lambda p, kw, c: pad(p[0], p[1])),
    (("_foreach_addcmul", "_foreach_addcmul_"),
     lambda p, kw, c: p[0] + scale(pam(p[1], p[2], c), kw.get("value", p[3] if len(p) > 3 else 1))),
    (("_foreach_addcdiv", "_foreach_addcdiv_"),
     lambda p, kw, c: p[0] + scale(pad(p[1], p[2]), kw.get("value", p[3] if len(p) > 3 else 1))),
    (("_foreach_lerp", "_foreach_lerp_"), lambda p, kw, c: p[0] + pam(p[1] - p[0], p[2], c)),
    (("_foreach_sqrt", "_foreach_sqrt_"), lambda p, kw, c: arith.pa_sqrt(p[0])),
    (("_foreach_reciprocal", "_foreach_reciprocal_"), lambda p, kw, c: arith.pa_reciprocal(p[0])),
    (("_foreach_pow", "_foreach_pow_"), lambda p, kw, c: arith.pa_pow(p[0], float(p[1]))),
]:
    implements([getattr(aten, n) for n in _names if hasattr(aten, n)], "optimizer")(_foreach(_fn))


# The add/sub foreach ops multiply only through ``alpha``.
@implements([aten._foreach_add, aten._foreach_add_, aten._foreach_sub, aten._foreach_sub_], "optimizer")
def _pa_foreach_add(func, args, kwargs, cfg):
    alpha = kwargs.get("alpha", 1)
    sub = func.overloadpacket.__name__.startswith("_foreach_sub")

    def one(p, kw, c):
        b = scale(p[1], alpha)
        return p[0] - b if sub else p[0] + b
    return _foreach(one)(func, args, {}, cfg)
