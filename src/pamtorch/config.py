"""Which op kinds are piecewise affine, with which derivative and offset.

``Config`` is frozen; build variants with the presets and ``with_derivative`` / ``replace``:

    Config.paper()                                   # the paper's released fully-PA command
    Config.paper_exact_loss()                        # the same, exact derivative for the loss
    Config.matmul_only()                             # only matrix products PA
    Config.full()                                    # everything PA, approx derivatives
    Config.ablation("matmul", "softmax", "norm")     # the cumulative rows of Table 3
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .arith import check_mantissa_bits, check_offset
from .autograd import DERIVATIVES

__all__ = ["KINDS", "OFFSET_KINDS", "OpConfig", "Config"]

# op kinds, in the order of the paper's cumulative ablation (Table 3) plus the rest
KINDS = ("matmul", "softmax", "norm", "loss", "optimizer", "elementwise", "nonlinear")


# derivative kinds only the loss kind takes. "balanced": the approx derivative of the PA
# log-softmax, dy - pa_exp(y) ⊙̂ Σdy, with each row's residual sum (0 in exact arithmetic for a
# loss's gradient, up to ±18% of the target's pull with PA exp) subtracted at the row's largest
# y: additions only. docs/nn.md, "The loss's derivative"
LOSS_ONLY_DERIVATIVES = ("balanced",)

# the kinds whose PA ops take an offset: the matrix products (per product term), the
# elementwise PAM, PAD, exp and log, and the optimizer's PAMs and PADs
OFFSET_KINDS = ("matmul", "elementwise", "optimizer")


@dataclass(frozen=True)
class OpConfig:
    """One op kind: ``pa`` whether it is piecewise affine (else left exact), the
    ``derivative`` kind ("approx", "exact" or "ste"; the loss kind also "balanced"), the PAM ``offset`` α (None: none;
    0.5 <= α <= 2, applied per PAM/PAD as an integer added to the pattern, for the kinds in
    ``OFFSET_KINDS`` only) and ``mantissa_bits`` k (None: the dtype's own; 1 <= k <= 23:
    the operands and results of the kind's PA ops are rounded to k mantissa bits, ties to
    even, docs/numerics.md "Narrow mantissas")."""

    pa: bool = True
    derivative: str = "approx"
    offset: float | None = None
    mantissa_bits: int | None = None

    def __post_init__(self):
        if self.derivative not in DERIVATIVES + LOSS_ONLY_DERIVATIVES:
            raise ValueError(f"OpConfig.derivative must be one of {DERIVATIVES + LOSS_ONLY_DERIVATIVES}, "
                             f"got {self.derivative!r}")
        object.__setattr__(self, "offset", check_offset(self.offset, "OpConfig"))
        check_mantissa_bits(self.mantissa_bits, "OpConfig")
        if not self.pa and (self.offset is not None or self.mantissa_bits is not None):
            raise ValueError("OpConfig: offset and mantissa_bits need pa=True (they change PA "
                             f"arithmetic; pa=False leaves the kind exact), got offset={self.offset}, "
                             f"mantissa_bits={self.mantissa_bits}")


_EXACT_ARITH = OpConfig(pa=False)


@dataclass(frozen=True)
class Config:
    """Per-kind settings. ``matmul``: mm/bmm/linear/conv/attention products. ``softmax``:
    softmax (attention's included). ``norm``: layer and RMS norm. ``loss``: log-softmax,
    cross entropy, NLL, MSE (log-softmax is the loss's first half, as in the paper's
    released code, whose loss config also governs the decoder's log-probabilities; the op
    table files ``aten._log_softmax`` under "loss" too). ``optimizer``: the optimizer step
    (including ``_foreach_*`` ops). ``elementwise``: mul, div, pow, sqrt, exp, log and
    friends anywhere else. ``nonlinear``: GELU, tanh, sigmoid, SiLU.

    The defaults (every kind PA, approx derivatives, no offset) are ``Config.paper()``."""

    matmul: OpConfig = field(default_factory=OpConfig)
    softmax: OpConfig = field(default_factory=OpConfig)
    norm: OpConfig = field(default_factory=OpConfig)
    loss: OpConfig = field(default_factory=OpConfig)
    optimizer: OpConfig = field(default_factory=OpConfig)
    elementwise: OpConfig = field(default_factory=OpConfig)
    nonlinear: OpConfig = field(default_factory=OpConfig)

    def __post_init__(self):
        for k in KINDS:
            op = getattr(self, k)
            if not isinstance(op, OpConfig):
                raise TypeError(f"Config.{k} must be an OpConfig, got {type(op).__name__}")
            if op.derivative in LOSS_ONLY_DERIVATIVES and k != "loss":
                raise ValueError(f"Config.{k}: derivative={op.derivative!r} is a derivative of the loss "
                                 f"kind's log-softmax only; the {k!r} kind takes one of {DERIVATIVES}")
            if op.offset is not None and k not in OFFSET_KINDS:
                raise ValueError(f"Config.{k}: the {k!r} kind cannot take a PAM offset (got "
                                 f"offset={op.offset}); kinds that take one: {', '.join(OFFSET_KINDS)}")

    # -- presets ---------------------------------------------------------------
    @classmethod
    def paper(cls) -> "Config":
        """What the paper's released fully-PA command runs (epfml/pam README, IWSLT14:
        ``--linear-cfg``, ``--norm-cfg``, ``--functional-cfg`` and ``--loss-functional-cfg``
        all ``{"type"/"subtype": "pam", "dkwargs": {"approx_bwd": true}}`` plus
        ``--opt-functional-cfg pam``): every op kind PA with the approx derivative, the
        loss included. Same kinds and derivatives as :meth:`full`."""
        return cls()

    @classmethod
    def paper_exact_loss(cls) -> "Config":
        """:meth:`paper` with the exact derivative for the loss kind (log-softmax, cross
        entropy, NLL, MSE): the true derivative of the PA loss as computed. No released
        command runs it; it is the derivative variant for the loss, which pamtorch called
        ``paper`` until issue 11 (RESULTS.md's ``paper-exact-loss`` rows)."""
        return cls(loss=OpConfig(derivative="exact"))

    @classmethod
    def full(cls) -> "Config":
        """pamtorch's name for the whole training step PA: every op kind (matrix products,
        softmax, norms, loss, optimizer, elementwise, nonlinear) with approx derivatives.
        The kinds and derivatives of :meth:`paper`."""
        return cls()

    @classmethod
    def matmul_only(cls) -> "Config":
        """Only the matrix products PA, approx derivatives: the first row of the paper's
        cumulative ablation (Table 3), and what the released DeiT ``pam`` command runs
        (``linear_cfg``, ``conv_cfg`` and ``bmm_cfg`` pam with ``approx_bwd``)."""
        return cls.ablation("matmul")

    @classmethod
    def ablation(cls, *kinds: str, derivative: str = "approx") -> "Config":
        """PA for exactly ``kinds`` (with ``derivative``), the rest exact arithmetic: the
        cumulative rows of the paper's Table 3 (matmul, +softmax, +norm, +loss, ...)."""
        for k in kinds:
            if k not in KINDS:
                raise ValueError(f"Config.ablation: unknown op kind {k!r}; kinds are {KINDS}")
        return cls(**{k: OpConfig(derivative=derivative) if k in kinds else _EXACT_ARITH
                      for k in KINDS})

    @classmethod
    def from_name(cls, name: str, derivative: str | None = None) -> "Config":
        """A preset by name ("paper", "paper-exact-loss", "pam-full"/"full",
        "pam-matmul"/"matmul-only", or op kinds joined by '+' such as
        "matmul+softmax+norm" for an ablation row), with every PA kind's derivative
        overridden by ``derivative`` unless it is None or "paper" (keep the preset's)."""
        presets = {"paper": cls.paper, "paper-exact-loss": cls.paper_exact_loss,
                   "full": cls.full, "pam-full": cls.full,
                   "matmul-only": cls.matmul_only, "pam-matmul": cls.matmul_only}
        if name in presets:
            cfg = presets[name]()
        elif all(k in KINDS for k in name.split("+")):
            cfg = cls.ablation(*name.split("+"))
        else:
            raise ValueError(f"Config.from_name: unknown preset {name!r}; choose from {sorted(presets)} "
                             f"or '+'-joined op kinds from {KINDS} (e.g. 'matmul+softmax')")
        if derivative in (None, "paper"):
            return cfg
        return cfg.with_derivative(derivative)

    # -- variants ----------------------------------------------------------------
    def with_derivative(self, derivative: str) -> "Config":
        """The same config with every PA kind's derivative set to ``derivative``."""
        return dataclasses.replace(self, **{
            k: dataclasses.replace(getattr(self, k), derivative=derivative)
            for k in KINDS if getattr(self, k).pa})

    def with_mantissa_bits(self, k: int | None) -> "Config":
        """The same config with every PA kind's operands and results rounded to ``k``
        mantissa bits (None: full width)."""
        check_mantissa_bits(k, "Config.with_mantissa_bits")
        return dataclasses.replace(self, **{
            name: dataclasses.replace(getattr(self, name), mantissa_bits=k)
            for name in KINDS if getattr(self, name).pa})

    def replace(self, **kinds: OpConfig) -> "Config":
        return dataclasses.replace(self, **kinds)

    def kind(self, name: str) -> OpConfig:
        return getattr(self, name)
