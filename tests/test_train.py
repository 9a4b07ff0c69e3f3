"""End-to-end runs of ``pamtorch train`` at tiny sizes: files, exact resume, non-finite stop,
--compare, translate/lm on files in the real formats, and DDP on 2 CPU processes."""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pamtorch.recipes import train as T

SRC = str(Path(__file__).resolve().parents[1] / "src")
VIT = ["vit", "--set", "dim=32", "--set", "depth=2", "--set", "mlp_dim=64", "--no-progress", "--threads", "1"]


def train(argv):
    """One in-process ``pamtorch train`` run; --debug: an error raises with its traceback."""
    assert T.main(list(argv) + ["--debug"]) == 0


def losses(out):
    return [r["loss"] for r in T.read_jsonl(Path(out) / "train_log.jsonl")]


def test_cli_hook_registers_train():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    T.add_train_parser(sub)
    args = p.parse_args(["train", "vit", "--arith", "pam-full", "--derivative", "exact", "--compare"])
    assert args.func is T.run_train and args.recipe == "vit" and args.compare == T.DEFAULT_COMPARE
    assert args.arith == "pam-full" and args.derivative == "exact"


def test_per_kind_derivatives():
    """--derivative KIND=D,... sets only those kinds (the paper's ablations); the rest keep the preset's."""
    cfg = T.arith_config("pam-full", "matmul=exact,softmax=exact")
    assert cfg.matmul.derivative == "exact" and cfg.softmax.derivative == "exact"
    assert {cfg.kind(k).derivative for k in ("norm", "loss", "optimizer", "elementwise", "nonlinear")} == {"approx"}
    assert T.arith_config("paper-exact-loss", "matmul=exact").loss.derivative == "exact"
    assert T.arith_config("pam-full", "exact").norm.derivative == "exact"
    with pytest.raises(T.UserError, match="the 'softmax' kind is exact arithmetic in this --arith"):
        T.arith_config("pam-matmul", "softmax=exact")


def test_vit_run_writes_everything(tmp_path):
    out = tmp_path / "run"
    train(VIT + ["--steps", "12", "--eval-every", "6", "--batch-size", "32", "--out", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    assert m["completed"] and m["steps"] == 12 and 0 <= m["accuracy"] <= 1 and m["valid_loss"] > 0
    assert m["macs_per_step"] > 0 and m["energy_mj_per_step_estimate"] > 0 and "ESTIMATE" in m["energy_note"]
    rows = T.read_jsonl(out / "train_log.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13)) and {"loss", "lr", "grad_norm", "img_per_s"} <= set(rows[0])
    assert [r["step"] for r in T.read_jsonl(out / "eval_log.jsonl")] == [6, 12]
    assert (out / "curves.png").stat().st_size > 1000
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 12 and "model" in ckpt and "optimizer" in ckpt and ckpt["rng_cpu"].dtype == torch.uint8
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave nothing behind


def test_same_seed_same_run(tmp_path):
    run = VIT + ["--steps", "5", "--eval-every", "5", "--batch-size", "16"]
    train(run + ["--out", str(tmp_path / "a")])
    train(run + ["--out", str(tmp_path / "b")])
    train(run + ["--seed", "1", "--out", str(tmp_path / "c")])
    assert losses(tmp_path / "a") == losses(tmp_path / "b") != losses(tmp_path / "c")


TINY = {
    "vit": VIT,
    "lm": ["lm", "--set", "block_size=32", "--no-progress", "--threads", "1"],
    "translate": ["translate", "--set", "d_model=32", "--set", "enc_layers=1", "--set", "dec_layers=1",
                  "--beam", "2", "--eval-sentences", "8", "--no-progress", "--threads", "1"],
}


@pytest.mark.parametrize("recipe", ["vit", "lm", "translate"])
def test_resume_is_exact(tmp_path, recipe):
    base = TINY[recipe] + ["--steps", "16", "--eval-every", "5", "--batch-size", "16", "--dropout", "0.1"]
    train(base + ["--out", str(tmp_path / "full")])
    train(base + ["--out", str(tmp_path / "part"), "--stop-at", "8"])  # "interrupted" after step 8
    assert len(losses(tmp_path / "part")) == 8
    train(base + ["--out", str(tmp_path / "part"), "--resume"])
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("full", "part"))
    assert a["valid_loss"] == b["valid_loss"]


def test_resume_of_a_finished_run_redoes_the_final_evaluation(tmp_path):
    """The final checkpoint is written before the final evaluation, so an interrupted final
    evaluation (a long beam search) costs no training: --resume only evaluates again."""
    run = TINY["translate"] + ["--steps", "4", "--eval-every", "2", "--batch-size", "8", "--out", str(tmp_path)]
    train(run)
    first = json.loads((tmp_path / "metrics.json").read_text())
    (tmp_path / "metrics.json").unlink()
    train(run + ["--resume"])
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["step"] for r in T.read_jsonl(tmp_path / "eval_log.jsonl")] == [2, 4]
    assert len(losses(tmp_path)) == 4
    for key in ("valid_loss", "bleu", "test_bleu", "accuracy"):
        assert again[key] == first[key]


def test_resume_refuses_other_config(tmp_path, capsys):
    train(VIT + ["--steps", "3", "--eval-every", "3", "--batch-size", "16", "--out", str(tmp_path)])
    capsys.readouterr()
    assert T.main(VIT + ["--steps", "3", "--batch-size", "16", "--set", "heads=2", "--out", str(tmp_path),
                         "--resume", "--allow-changes"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pamtorch: error: --resume:") and "model_config" in err


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    assert T.main(VIT + ["--steps", "12", "--eval-every", "5", "--batch-size", "16", "--out", str(tmp_path),
                         "--debug-nan-at", "7"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.match(r"pamtorch: error: training diverged \(fp32\): non-finite loss \(nan\) at step 7; stopping\. "
                    r"The last good checkpoint is .*checkpoint.pt \(step 5\)$", err.strip()), err
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 5 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert len(losses(tmp_path)) == 6


def test_compare(tmp_path):
    train(VIT + ["--steps", "4", "--eval-every", "4", "--batch-size", "16", "--compare", "fp32,pam-matmul",
                  "--out", str(tmp_path)])
    res = json.loads((tmp_path / "compare.json").read_text())
    assert set(res) == {"fp32", "pam-matmul"} and "valid_loss" in res["fp32"]
    md = (tmp_path / "compare.md").read_text()
    assert "| fp32 |" in md and "| pam-matmul |" in md and "estimate" in md.lower()
    assert (tmp_path / "compare.png").is_file() and (tmp_path / "fp32" / "metrics.json").is_file()
    import pamtorch

    if hasattr(pamtorch, "mode"):  # the PA variant trains once the dispatch mode exists
        assert "valid_loss" in res["pam-matmul"], res["pam-matmul"]
        assert res["pam-matmul"]["energy_mj_per_step_estimate"] < res["fp32"]["energy_mj_per_step_estimate"]
    else:
        assert "pamtorch.mode" in res["pam-matmul"]["error"]


def test_compare_table_deltas():
    res = {"fp32": {"valid_loss": 1.0, "accuracy": 0.5, "step_time_s": 0.1, "energy_mj_per_step_estimate": 4.6},
           "pam-full": {"valid_loss": 1.25, "accuracy": 0.25, "step_time_s": 0.4, "energy_mj_per_step_estimate": 1.0},
           "paper": {"error": "boom"}}
    table = T.compare_table(res, "accuracy")
    assert "| pam-full | 1.2500 | +0.2500 | 0.2500 | -0.2500 | 400.0 | 4.00 | 1 | 0.22 |" in table
    assert "| paper | failed: boom" in table


def test_translate_on_iwslt_layout(tmp_path):
    data = tmp_path / "de-en"
    data.mkdir()
    words = [("hallo", "hello"), ("welt", "world"), ("haus", "house"), ("katze", "cat"), ("hund", "dog")]
    for split, n in (("train", 200), ("valid", 10), ("test", 10)):
        de, en = [], []
        for i in range(n):
            pick = [words[(i * 7 + k * 3) % 5] for k in range(2 + i % 4)]
            de.append(" ".join(p[0] for p in pick))
            en.append(" ".join(p[1] for p in pick))
        (data / f"{split}.de").write_text("\n".join(de) + "\n")
        (data / f"{split}.en").write_text("\n".join(en) + "\n")
    out = tmp_path / "run"
    train(["translate", "--data-dir", str(data), "--src", "de", "--tgt", "en", "--steps", "6", "--eval-every", "6",
            "--batch-size", "16", "--beam", "2", "--vocab-size", "300", "--no-progress", "--out", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    assert {"valid_loss", "accuracy", "bleu", "test_bleu"} <= set(m) and 0 <= m["bleu"] <= 100
    assert len(m["examples"]) == 3 and (out / "tokenizer.json").is_file()
    assert "tok_per_s" in T.read_jsonl(out / "train_log.jsonl")[0]


def test_lm_on_text_file(tmp_path):
    f = tmp_path / "input.txt"
    f.write_text("to be or not to be, that is the question. " * 100)
    train(["lm", "--data-dir", str(f), "--set", "block_size=32", "--steps", "5", "--eval-every", "5", "--batch-size", "8",
            "--no-progress", "--out", str(tmp_path / "run")])
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["valid_loss"] > 0 and 0 <= m["accuracy"] <= 1


def test_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    assert T.main(["translate", "--data-dir", str(tmp_path), "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"pamtorch: error: {tmp_path / 'train.de'}: file not found")


def test_ddp_two_processes_equal_one_process(tmp_path):
    """torchrun with 2 gloo processes, each accumulating 2 micro-batches (--accum 2: DDP all-reduces at
    the last one), PA gradient average, = 1 process with the same global batch in one pass."""
    common = ["-m", "pamtorch.recipes.train"] + VIT + ["--steps", "6", "--eval-every", "3", "--dropout", "0"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + common
                   + ["--batch-size", "16", "--accum", "2", "--out", str(tmp_path / "ddp")], env=env, check=True,
                   timeout=300, capture_output=True)
    subprocess.run([sys.executable] + common + ["--batch-size", "32", "--threads", "1", "--out", str(tmp_path / "one")],
                   env=env, check=True, timeout=300, capture_output=True)
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert len(a) == len(b) == 6 and a == pytest.approx(b, rel=1e-5, abs=1e-6)
    gnorm = [[r["grad_norm"] for r in T.read_jsonl(tmp_path / d / "train_log.jsonl")] for d in ("ddp", "one")]
    assert gnorm[0] == pytest.approx(gnorm[1], rel=1e-4)  # the averaged gradient, not the sum
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ddp", "one"))
    assert ma["world_size"] == 2 and ma["valid_loss"] == pytest.approx(mb["valid_loss"], rel=1e-5)
    pa = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["model"]
    pb = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["model"]
    for k in pa:  # Adam rescales near-zero gradients (the key bias's is 0 in exact arithmetic): atol ~ lr/100
        assert torch.allclose(pa[k], pb[k], rtol=1e-4, atol=1e-5 if "in_proj_bias" not in k else 1e-4), k


DDP_SCRIPT = r'''
import os, sys, torch, torch.nn as nn, torch.distributed as dist
from pamtorch.recipes.train import arith_context, make_allreduce_hook
arith, out = sys.argv[1], sys.argv[2]
world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 3))
x, y = torch.randn(4, 8, 6), torch.randint(0, 3, (4, 8))  # 4 steps, global batch 8
net = model
if world > 1:
    dist.init_process_group("gloo")
    net = nn.parallel.DistributedDataParallel(model)
    net.register_comm_hook(None, make_allreduce_hook(arith))
opt = torch.optim.SGD(model.parameters(), lr=0.1)  # (unlike Adam) sensitive to the gradient's scale
ctx = arith_context(arith)
for step in range(4):
    xs, ys = x[step].tensor_split(world)[rank], y[step].tensor_split(world)[rank]
    with ctx():
        loss = nn.functional.cross_entropy(net(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
if rank == 0:
    torch.save(model.state_dict(), out)
if world > 1:
    dist.destroy_process_group()
'''


def test_ddp_pa_gradient_average_under_pamtorch_mode(tmp_path):
    """The comm hook (SUM all-reduce outside the mode, then pamtorch.div) inside pamtorch.mode:
    2 processes = 1 process with the same global batch (PA division by 2 is exact)."""
    script = tmp_path / "ddp_mlp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), "pam-matmul", str(tmp_path / "two.pt")], env=env, timeout=300,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    subprocess.run([sys.executable, str(script), "pam-matmul", str(tmp_path / "one.pt")], env=env, check=True,
                   timeout=300, capture_output=True)
    a = torch.load(tmp_path / "two.pt", weights_only=True)
    b = torch.load(tmp_path / "one.pt", weights_only=True)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max())


@pytest.mark.parametrize("recipe", ["translate", "lm"])
def test_torchrun_two_processes_under_pamtorch_mode(tmp_path, recipe):
    """The translate and lm recipes run under torchrun (2 gloo processes) multiplication-free."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "pamtorch.recipes.train"] + TINY[recipe]
                       + ["--arith", "pam-full", "--steps", "4", "--eval-every", "4", "--batch-size", "8",
                          "--out", str(out)], env=env, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["completed"] and m["valid_loss"] > 0
    assert all(torch.isfinite(torch.tensor(losses(out))))


# ----------------------------------------------------------------------------- --accum (issue 11 item 8)


def _params(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.parametrize("recipe", ["vit", "lm"])
def test_accum_equals_the_big_batch_in_fp32(tmp_path, recipe):
    """--accum 2 --batch-size 8 takes the step of --batch-size 16 on the same 16 items, up to float
    summation order (dropout off: its random draws differ between one and two passes)."""
    base = TINY[recipe] + ["--steps", "4", "--eval-every", "4", "--dropout", "0"]
    train(base + ["--batch-size", "16", "--out", str(tmp_path / "big")])
    train(base + ["--batch-size", "8", "--accum", "2", "--out", str(tmp_path / "acc")])
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "big"), rel=1e-5)
    gn = [[r["grad_norm"] for r in T.read_jsonl(tmp_path / d / "train_log.jsonl")] for d in ("big", "acc")]
    assert gn[1] == pytest.approx(gn[0], rel=1e-4)  # the mean of the micro-batch gradients, not their sum
    a, b = _params(tmp_path / "big"), _params(tmp_path / "acc")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5 if "in_proj_bias" not in k else 1e-4), k
    m = json.loads((tmp_path / "acc" / "metrics.json").read_text())
    assert m["accum"] == 2 and m["batch_size"] == 8
    assert m["macs_per_step"] == json.loads((tmp_path / "big" / "metrics.json").read_text())["macs_per_step"]


class _Regression:
    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y), len(y)


@pytest.mark.parametrize("n", [2, 3])
def test_accum_under_the_mode_is_the_pa_mean_of_the_micro_batch_gradients(n):
    """Under pam-full the accumulated gradient is pamtorch.div(g_1 + ... + g_n, n) bit for bit, each g_k
    the micro-batch's PA gradient: the only new arithmetic is one PA division per gradient element."""
    import pamtorch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))
    micro = [(torch.randn(4, 5), torch.randn(4, 3)) for _ in range(n)]
    ctx = T.arith_context("pam-full")
    total = None
    for mb in micro:
        model.zero_grad(set_to_none=True)
        with ctx():
            _Regression().loss(model, mb)[0].backward()
        g = [p.grad.clone() for p in model.parameters()]
        total = g if total is None else [t + x for t, x in zip(total, g)]
    expected = [pamtorch.div(t, n) for t in total]
    model.zero_grad(set_to_none=True)
    loss, items = T.accumulate_gradients(_Regression(), model, micro, ctx, "pam-full")
    assert items == 4 * n and loss.dtype == torch.float32
    for p, e, t in zip(model.parameters(), expected, total):
        assert torch.equal(p.grad, e)
        if n == 2:  # a PA division by a power of two is exact
            assert torch.equal(p.grad, t / 2)
    if n == 3:  # and otherwise PA, not the float quotient
        assert not all(torch.equal(p.grad, t / 3) for p, t in zip(model.parameters(), total))


def test_accum_resume_is_exact_and_a_changed_accum_is_refused(tmp_path, capsys):
    base = TINY["vit"] + ["--steps", "6", "--eval-every", "3", "--batch-size", "8", "--accum", "2"]
    train(base + ["--out", str(tmp_path / "full")])
    train(base + ["--out", str(tmp_path / "part"), "--stop-at", "3"])
    train(base + ["--out", str(tmp_path / "part"), "--resume"])
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    capsys.readouterr()
    assert T.main(base[:-1] + ["4", "--out", str(tmp_path / "part"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "accum 2 -> 4" in err and "--allow-changes" in err


# ----------------------------------------------------------------------------- --eval-arith (issue 11 item 8)


def _evaluate_checkpoint(argv, out, arith):
    """The final evaluation of the run in ``out``, redone on its checkpoint in ``arith``."""
    p = argparse.ArgumentParser()
    T.add_arguments(p)
    args = p.parse_args(argv)
    recipe = T.get_recipe(args.recipe)
    hp = T.resolve_hparams(args, recipe)
    torch.manual_seed(args.seed)
    task = recipe.Task(args, hp, None, torch.device("cpu"))
    task.model.load_state_dict(torch.load(Path(out) / "checkpoint.pt", weights_only=True)["model"])
    with T.arith_context(arith)():
        return task.evaluate(task.model, final=True)


@pytest.mark.parametrize("recipe", ["vit", "translate"])
def test_eval_arith_exact_evaluates_and_decodes_outside_the_mode(tmp_path, recipe):
    """--eval-arith exact: the evaluation (and translate's beam search) of a pam-full run is the
    float evaluation of its weights; --eval-arith same (the default) is the PA one, which differs."""
    base = TINY[recipe] + ["--arith", "pam-full", "--steps", "2", "--eval-every", "2", "--batch-size", "8"]
    metric = "bleu" if recipe == "translate" else "accuracy"
    for how, arith in (("exact", "fp32"), ("same", "pam-full")):
        out = tmp_path / how
        train(base + ["--eval-arith", how, "--out", str(out)])
        m = json.loads((out / "metrics.json").read_text())
        again = _evaluate_checkpoint(base, out, arith)
        assert m["eval_arith"] == how
        assert (m["valid_loss"], m[metric]) == (again["valid_loss"], again[metric]), how
    exact, same = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("exact", "same"))
    assert exact["valid_loss"] != same["valid_loss"]
    assert losses(tmp_path / "exact") == losses(tmp_path / "same")  # training is the same either way


# ----------------------------------------------------------------------------- presets in runs (issue 11 item 8)


def test_translate_token_batches_with_accum_run_and_resume(tmp_path):
    base = TINY["translate"] + ["--max-tokens", "200", "--accum", "2", "--steps", "6", "--eval-every", "3"]
    train(base + ["--out", str(tmp_path / "full")])
    m = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert m["max_tokens"] == 200 and m["accum"] == 2 and m["completed"]
    train(base + ["--out", str(tmp_path / "part"), "--stop-at", "3"])
    train(base + ["--out", str(tmp_path / "part"), "--resume"])
    assert losses(tmp_path / "part") == losses(tmp_path / "full")


def test_deit_tiny_preset_in_a_run(tmp_path):
    """The deit-tiny preset's training settings reach the run: 5 warmup epochs as steps, min lr,
    no clipping, augmentation (on the digits at 8x8 here: the model is cut down with --set)."""
    train(["vit", "--preset", "deit-tiny", "--set", "img_size=8", "--set", "patch_size=2", "--set", "dim=16",
           "--set", "depth=2", "--set", "heads=2", "--set", "mlp_dim=16", "--batch-size", "16", "--steps", "2",
           "--eval-every", "2", "--no-progress", "--threads", "1", "--out", str(tmp_path)])
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert (m["warmup_steps"], m["min_lr"], m["clip"], m["augment"], m["lr"]) == (5 * (1437 // 16), 1e-5, 0.0, True, 5e-4)
    assert (m["model_config"]["drop_path"], m["model_config"]["ln_eps"]) == (0.1, 1e-6)


@pytest.mark.parametrize("arg,expected", [
    (["--accum", "0"], "argument --accum: expected a positive integer, got '0'"),
    (["--max-tokens", "-5"], "argument --max-tokens: expected a positive integer"),
    (["--eval-arith", "fast"], "argument --eval-arith: invalid choice: 'fast'"),
    (["--optimizer", "adam"], "argument --optimizer: invalid choice: 'adam'"),
])
def test_new_arguments_refuse_bad_values_in_one_line(capsys, arg, expected):
    with pytest.raises(SystemExit) as e:
        T.main(["vit"] + [f"{arg[0]}={arg[1]}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and expected in err, err


# ----------------------------------------------------------------------------- --mantissa-bits (issue 11 item 5)


def test_mantissa_bits_option_rounds_the_run_and_a_change_is_refused_on_resume(tmp_path, capsys):
    """--mantissa-bits K runs Config.with_mantissa_bits(K) of the --arith preset, is stored with the
    run's settings, and --resume refuses another K; K = 23 is float32's width (the run unchanged)."""
    import pamtorch

    assert T.arith_config("pam-full", None, 5) == pamtorch.Config.full().with_mantissa_bits(5)
    base = TINY["vit"] + ["--arith", "pam-full", "--steps", "3", "--eval-every", "3", "--batch-size", "8"]
    train(base + ["--out", str(tmp_path / "plain")])
    train(base + ["--mantissa-bits", "23", "--out", str(tmp_path / "k23")])
    train(base + ["--mantissa-bits", "5", "--out", str(tmp_path / "k5"), "--stop-at", "1"])
    capsys.readouterr()
    assert T.main(base + ["--mantissa-bits", "7", "--out", str(tmp_path / "k5"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mantissa_bits 5 -> 7" in err and "--allow-changes" in err
    train(base + ["--mantissa-bits", "5", "--out", str(tmp_path / "k5"), "--resume"])
    m = {d: json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("plain", "k23", "k5")}
    assert (m["plain"]["mantissa_bits"], m["k23"]["mantissa_bits"], m["k5"]["mantissa_bits"]) == (None, 23, 5)
    assert losses(tmp_path / "k23") == losses(tmp_path / "plain") != losses(tmp_path / "k5")
    assert len(losses(tmp_path / "k5")) == 3


@pytest.mark.parametrize("argv,expected", [
    (["--arith", "pam-full", "--mantissa-bits", "0"], "argument --mantissa-bits: Config.with_mantissa_bits: "
                                                      "mantissa_bits must be between 1 and 23 (float32's mantissa "
                                                      "width), got 0 (see"),
    (["--arith", "pam-full", "--mantissa-bits", "24"], "must be between 1 and 23 (float32's mantissa width), got 24"),
    (["--arith", "pam-full", "--mantissa-bits", "7.5"], "argument --mantissa-bits: expected an integer from 1 to 23, "
                                                        "got '7.5'"),
])
def test_mantissa_bits_outside_1_to_23_is_one_line(capsys, argv, expected):
    with pytest.raises(SystemExit) as e:
        T.main(["vit"] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and expected in err, err


def test_mantissa_bits_with_fp32_is_refused(tmp_path, capsys):
    assert T.main(TINY["vit"] + ["--mantissa-bits", "7", "--steps", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--arith fp32 has none" in err, err


def test_balanced_loss_derivative_on_the_command_line():
    """--derivative loss=balanced (only the loss kind takes it)."""
    assert T.arith_config("pam-full", "loss=balanced").loss.derivative == "balanced"
    assert T.arith_config("pam-full", "loss=balanced").matmul.derivative == "approx"
    assert T.DERIVATIVE("matmul=exact,loss=balanced") == "matmul=exact,loss=balanced"
    for bad in ("balanced", "matmul=balanced"):
        with pytest.raises(argparse.ArgumentTypeError, match="approx|balanced"):
            T.DERIVATIVE(bad)


def test_smoothing_fairseq_runs_is_recorded_and_a_change_is_refused(tmp_path, capsys):
    """--smoothing fairseq trains another loss than torch's spread (other losses, same seed);
    the run records it, and resuming with the other spread is refused in one line."""
    base = TINY["vit"] + ["--steps", "3", "--eval-every", "3", "--batch-size", "8", "--label-smoothing", "0.2"]
    train(base + ["--out", str(tmp_path / "torch")])
    train(base + ["--out", str(tmp_path / "fairseq"), "--smoothing", "fairseq", "--stop-at", "2"])
    first = losses(tmp_path / "fairseq")
    assert first[0] != losses(tmp_path / "torch")[0]
    train(base + ["--out", str(tmp_path / "fairseq"), "--smoothing", "fairseq", "--resume"])
    assert losses(tmp_path / "fairseq")[:2] == first and len(losses(tmp_path / "fairseq")) == 3
    capsys.readouterr()
    assert T.main(base + ["--out", str(tmp_path / "fairseq"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "smoothing" in err and "--allow-changes" in err
