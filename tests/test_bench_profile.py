"""pamtorch bench profile (where a step's time goes) and the mode's cached classification."""
import importlib

import pytest
import torch

import pamtorch
from pamtorch import Config, bench
from pamtorch.cli import main
from pamtorch.mode import FREE_WHEN, OP_TABLE, PASS_THROUGH, classify
from pamtorch.nn import functional as PF
from pamtorch.ops.table import _Entry

M = importlib.import_module("pamtorch.mode")
aten = torch.ops.aten
TINY_VIT = ("--set", "dim=16", "--set", "depth=1", "--batch-size", "8")


@pytest.fixture(scope="module")
def profile():
    return bench.bench_profile("vit", ("fp32", "pam-full"), reps=1, threads=1, train_args=TINY_VIT)


def test_profile_splits_the_step_by_kind_and_part(profile):
    (r,) = profile  # fp32 is the baseline, not a variant of its own
    assert r["variant"] == "pam-full" and r["x_fp32"] > 0 and r["t_fp32_ms"] > 0
    groups = {g["group"]: g for g in r["groups"]}
    assert {"matmul", "softmax", "norm", "loss", "optimizer", "pass-through", "rest"} <= set(groups)
    # the PAM products run in compiled kernels; pass-through ops never reach one
    assert groups["matmul"]["parts_ms"]["kernel"] > 0
    assert groups["pass-through"]["parts_ms"]["kernel"] == 0
    assert groups["pass-through"]["parts_ms"]["torch op"] > 0
    # the mode's handler is timed, for pass-through ops as for routed ones
    assert groups["pass-through"]["parts_ms"]["dispatch"] > 0 and groups["optimizer"]["parts_ms"]["dispatch"] > 0
    for g in r["groups"][:-1]:
        assert g["pa_ms"] == pytest.approx(sum(g["parts_ms"].values()))
    # the fp32 reference is grouped the same way: the matrix products are fp32's matmul group
    assert groups["matmul"]["fp32_ms"] > 0 and groups["pass-through"]["fp32_ms"] > 0
    assert r["pa_ops"] > 0 and r["fp32_ops"] > 0
    assert r["crossing_us"] > 0 and r["function_crossing_us"] > 0
    # torch.profiler's step-wide line: allocations and copies are part of all aten time
    for costs in (r["aten_ms"], r["fp32_aten_ms"]):
        assert 0 < costs["allocation"] + costs["conversion/copy"] < costs["all"]


def test_profile_table_has_a_row_per_group_and_a_share_column(profile):
    text = bench.format_profile_table(profile)
    assert "Other jobs shared the machine" in text
    assert "x fp32" in text and "% of PA step" in text and "mode handler" in text and "crossings" in text
    assert "Step-wide (torch.profiler" in text
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| matmul ")]
    assert len(rows) == 1 and float(rows[0][6]) > 0


def test_profiled_mode_trains_exactly_as_the_mode():
    # the profile must time the step that pamtorch.mode runs, not another one
    task, hp = bench._step_setup("vit", TINY_VIT, 0)
    (m1, o1), (m2, o2) = bench._copies(task, hp, 2)
    batch = task.batch(0, hp.batch_size, 0)
    cfg = Config.full()
    torch.manual_seed(1)
    with M.mode(cfg):
        bench._train_step(task, hp, m1, o1, batch)
    ProfiledPAMode, *_ = bench._profile_classes()
    from pamtorch.kernels import cpu
    prof = bench._Profile()
    saved = bench._install(prof, cpu.load_extension(), PF)
    try:
        torch.manual_seed(1)
        with M._entered(ProfiledPAMode(cfg, prof)):
            bench._train_step(task, hp, m2, o2, batch)
    finally:
        bench._restore(saved)
    assert PF.softmax_forward.__module__ == "pamtorch.nn.functional"  # restored
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    assert prof.self_t.get(("matmul", "kernel"), 0) > 0 and not prof.stack


def test_encoder_is_the_stock_transformer_of_the_benchmarks():
    task, hp = bench._step_setup("encoder", (), 0)
    enc = task.model[1]
    assert isinstance(enc, torch.nn.TransformerEncoder) and len(enc.layers) == 2
    assert enc.layers[0].self_attn.embed_dim == 128 and hp.batch_size == 16
    batch = task.batch(0, hp.batch_size, 0)
    assert batch.shape == (16, 65)  # 64 inputs and their next tokens
    loss, _ = task.loss(task.model, batch)
    assert torch.isfinite(loss)
    from pamtorch.recipes.train import UserError
    with pytest.raises(UserError, match="takes no pamtorch train options"):
        bench._step_setup("encoder", ("--batch-size", "4"), 0)


def test_bench_profile_command_appends_the_table(tmp_path):
    out = tmp_path / "B.md"
    assert main(["bench", "profile", "--recipe", "vit", "--variants", "pam-matmul", "--reps", "1",
                 "--threads", "1", "--output", str(out), "--train-args", *TINY_VIT]) == 0
    text = out.read_text()
    assert "bench profile" in text and "Machine:" in text and "pam-matmul" in text
    assert any(line.startswith("| matmul ") for line in text.splitlines())
    assert "Kernel route" in text   # the route pamtorch train runs, by default
    assert main(["bench", "profile", "--route", "dispatch", "--recipe", "vit", "--variants", "pam-matmul",
                 "--reps", "1", "--threads", "1", "--output", str(out), "--train-args", *TINY_VIT]) == 0
    assert "mode handler" in out.read_text()
    assert main(["bench", "step", "--route", "dispatch", "--no-append"]) == 2


def test_kernel_route_profile_groups_the_step_and_counts_the_calls_to_python():
    (full, matmul) = bench.bench_profile_kernel("vit", ("fp32", "pam-full", "pam-matmul"), reps=1, threads=1,
                                                train_args=TINY_VIT)
    for r in (full, matmul):
        assert r["x_fp32"] > 0 and r["profiled_pa_ms"] > 0 and r["profiled_fp32_ms"] > 0
        groups = {g["group"]: g for g in r["groups"]}
        assert {"matmul", "exact ops", "autograd engine", "outside any op"} <= set(groups)
        # the products: aten's in fp32; the route's C++ answers (aten ops) and the attention
        # route's autograd functions (_PamBMM...) under PA
        assert groups["matmul"]["fp32_ms"] > 0 and groups["matmul"]["pa_ms"] > 0
        assert groups["matmul"]["pa_calls"] > 0
        assert r["top_ops"] and all(o["excess_ms"] >= r["top_ops"][-1]["excess_ms"] for o in r["top_ops"])
    # pam-matmul: the products are answered in C++, none reaches Python
    assert not [q for _, _, q in matmul["python_calls"] if q.split("::")[1].split(".")[0] in ("mm", "addmm", "bmm")]
    # pam-full: the loss goes to the Python handler, counted there and in its group
    assert any("_log_softmax" in q for _, _, q in full["python_calls"])
    assert {g["group"]: g for g in full["groups"]}["loss"]["python_calls"] > 0
    text = bench.format_profile_kernel_table([full, matmul])
    assert "Kernel route" in text and "| loss |" in text and "to Python" in text
    # the route's handler is put back
    assert M._KernelRoute.ext is not None
    # a variant trained in bfloat16 (as bench step's ARITH@bfloat16): its products are
    # answered in C++ too, and its optimizer is one fused call
    (bf16,) = bench.bench_profile_kernel("vit", ("pam-full@bfloat16",), reps=1, threads=1, train_args=TINY_VIT)
    assert bf16["variant"] == "pam-full@bfloat16" and bf16["x_fp32"] > 0
    names = {q.split("::")[1].split(".")[0] for _, _, q in bf16["python_calls"]}
    assert not names & {"mm", "addmm", "bmm", "lerp_", "addcdiv_"} and "_fused_adamw_" in names
    with pamtorch.mode(Config.full()):
        y = torch.ones(2, 2) * torch.full((2, 2), 3.0)
    assert torch.equal(y, pamtorch.arith.pam(torch.ones(2, 2), torch.full((2, 2), 3.0)))


# ---------------------------------------------------------------------------
# the cached classification: per-overload facts, never per-call decisions

def test_a_cached_overload_still_decides_by_its_arguments():
    x, i = torch.randn(3), torch.arange(3)
    for _ in range(2):  # the second round runs on cached facts
        assert classify(aten.add.Tensor, (x, x), {}) == "free"
        assert classify(aten.add.Tensor, (x, x), {"alpha": 2}) == "routable"
        assert classify(aten.mul.Tensor, (x, x), {}) == "routable"
        assert classify(aten.mul.Tensor, (i, i), {}) == "free"
        assert classify(aten.mul.Tensor, (i, 1.5), {}) == "routable"   # integer inputs, float result
        assert classify(aten.div.Tensor, (x, x), {}) == "routable"
        assert classify(aten.div.Tensor, (x.to(torch.complex64), x), {}) == "unknown"
        assert classify(aten.round.decimals, (x,), {"decimals": 0}) == "free"
        assert classify(aten.round.decimals, (x,), {"decimals": 2}) != "free"  # scales by 10^2
        assert classify(aten.view.default, (x, [3]), {}) == "free"


def test_ops_registered_later_are_classified_by_the_new_tables():
    x = torch.randn(3)
    assert classify(aten.flip.default, (x, [0]), {}) == "free"
    OP_TABLE[aten.flip] = _Entry("elementwise", lambda func, args, kwargs, cfg: func(*args, **kwargs))
    try:
        assert classify(aten.flip.default, (x, [0]), {}) == "routable"
    finally:
        del OP_TABLE[aten.flip]
    assert classify(aten.flip.default, (x, [0]), {}) == "free"
    packet = aten.special_zeta
    assert packet not in PASS_THROUGH and packet not in OP_TABLE
    assert classify(packet.default, (x, x), {}) == "unknown"
    PASS_THROUGH.add(packet)
    try:
        assert classify(packet.default, (x, x), {}) == "free"
    finally:
        PASS_THROUGH.discard(packet)
    assert classify(packet.default, (x, x), {}) == "unknown"
    FREE_WHEN[aten.flip] = lambda func, args, kwargs: "a test condition"
    try:
        assert classify(aten.flip.default, (x, [0]), {}) == "unknown"
    finally:
        del FREE_WHEN[aten.flip]
    assert classify(aten.flip.default, (x, [0]), {}) == "free"


def test_pass_through_ops_skip_the_argument_scan_under_the_mode():
    calls = []
    scan = M._scan
    M._scan = lambda args, kwargs: calls.append(1) or scan(args, kwargs)
    try:
        x = torch.randn(4, 4)
        with M.mode(Config.full(), route="dispatch"):   # the dispatch mode's scan (the kernel route
            x.t().select(0, 1).view(4)                  # never hands a view to Python)
            assert not calls  # views and selects: one cached lookup each
            y = x * x
        assert calls  # a multiply-like op looks at its arguments
        assert not torch.equal(y, x * x)  # and ran PA (PAM differs from the float product)
    finally:
        M._scan = scan
