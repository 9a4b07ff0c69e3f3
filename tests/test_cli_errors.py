"""Issue 10: ``pamtorch train`` keeps runs (--out, --resume, --overwrite, --allow-changes), stops
cleanly on divergence, and answers every user mistake with one line ``pamtorch: error: ...`` and
exit status 2 (the traceback only with --debug). Tiny models, a few steps each."""
import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pamtorch.cli import main as cli
from pamtorch.recipes import train as T
from pamtorch.recipes.data import UserError

SRC = str(Path(__file__).resolve().parents[1] / "src")
VIT = ["train", "vit", "--set", "dim=16", "--set", "depth=1", "--set", "heads=2", "--set", "mlp_dim=32",
       "--no-progress", "--threads", "1", "--batch-size", "16", "--eval-every", "2"]
LM = ["train", "lm", "--set", "block_size=16", "--set", "n_embd=16", "--set", "n_layer=1", "--set", "n_head=2",
      "--no-progress", "--threads", "1", "--batch-size", "8", "--eval-every", "2"]


def ok(argv):
    """A run that must succeed (--debug: an error raises with its traceback)."""
    assert cli(list(argv) + ["--debug"]) == 0


def one_line_error(capsys, argv, code=2):
    """Run the CLI on ``argv``: exit status ``code`` and exactly one line on stderr, returned."""
    capsys.readouterr()
    try:
        rc = cli(list(argv))
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    assert rc == code, err
    lines = [line for line in err.splitlines() if line.startswith("pamtorch: error: ")]
    assert len(lines) == 1 and err.endswith(lines[0] + "\n") and "Traceback" not in err, err
    return lines[0]


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------------- item 13: arguments


@pytest.mark.parametrize("arg,value,expected", [
    ("--batch-size", "-4", "a positive integer"), ("--batch-size", "0", "a positive integer"),
    ("--steps", "0", "a positive integer"), ("--steps", "-3", "a positive integer"),
    ("--steps", "2.5", "a positive integer"), ("--epochs", "0", "a positive number"),
    ("--lr", "0", "a positive number"), ("--lr", "-1e-3", "a positive number"), ("--lr", "nan", "a positive number"),
    ("--lr", "inf", "a positive number"), ("--min-lr", "-1", "a number >= 0"), ("--warmup", "-2", "a number >= 0"),
    ("--weight-decay", "-0.1", "a number >= 0"), ("--clip", "-1", "a number >= 0"),
    ("--label-smoothing", "1.5", "a number >= 0 and < 1"), ("--dropout", "1", "a number >= 0 and < 1"),
    ("--seed", "-1", "an integer >= 0 and < 4294967296"), ("--eval-every", "0", "a positive integer"),
    ("--ckpt-every", "-1", "a positive integer"), ("--threads", "0", "a positive integer"),
    ("--beam", "0", "a positive integer"), ("--eval-sentences", "0", "a positive integer"),
    ("--vocab-size", "-5", "a positive integer"), ("--derivative", "exactly", "invalid choice"),
    ("--derivative", "matmull=exact", "unknown op kind 'matmull'"),
    ("--derivative", "matmul=exactly", "the derivative must be approx or exact"),
    ("--derivative", "matmul=exact,matmul=approx", "op kind 'matmul' is given twice"),
])
def test_bad_numbers_are_refused_by_the_parser(capsys, arg, value, expected):
    line = one_line_error(capsys, ["train", "vit", f"{arg}={value}"])  # "--lr -1e-3" reads -1e-3 as an option
    assert line.startswith(f"pamtorch: error: argument {arg}: ") and expected in line and "pamtorch train --help" in line


@pytest.mark.parametrize("extra,expected", [
    (["--set", "depth=abc"], "--set depth=abc: expected an integer"),
    (["--set", "depth"], "--set depth: expected KEY=VALUE"),
    (["--set", "depht=2"], "ViTConfig has no field 'depht'"),
    (["--set", "heads=3"], "--set dim=16 heads=3: dim must be divisible by heads"),
    (["--set", "depth=0"], "--set depth=0: expected an integer >= 1"),
    (["--set", "patch_size=3"], "--set patch_size=3: it must divide img_size=8"),
    (["--set", "num_classes=5"], "--set num_classes=5: the data has 10 classes"),
    (["--set", "dropout=2.0"], "--set dropout=2.0: expected 0 <= dropout < 1"),
    (["--preset", "huge"], "--preset huge: unknown preset for vit"),
    (["--arith", "pam-bogus"], "--arith pam-bogus: "),
    (["--device", "gpu7"], "--device gpu7: expected auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], "--device cuda:99: no such CUDA device"),
    (["--min-lr", "0.5", "--lr", "0.1"], "--min-lr 0.5 is above the peak learning rate 0.1"),
    (["--compare", "fp32,fp32"], "--compare fp32,fp32: expected distinct arithmetic names"),
    (["--compare", "fp32,pam-bogus"], "--arith pam-bogus"),
    (["--data", "svhn"], "--data svhn: unknown image data"),
    (["--data", "mnist"], "--data mnist needs --data-dir"),
])
def test_bad_settings_are_one_line(capsys, tmp_path, extra, expected):
    line = one_line_error(capsys, VIT + ["--steps", "1", "--out", str(tmp_path / "o")] + extra)
    assert expected in line, line
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_recipe_setting_mistakes(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abcdefgh " * 20)
    assert "expected true or false" in one_line_error(capsys, ["train", "translate", "--set", "norm_first=ture",
                                                               "--out", str(tmp_path / "a")])
    line = one_line_error(capsys, LM + ["--data-dir", str(text), "--set", "block_size=200", "--out", str(tmp_path / "b")])
    assert f"{text}: " in line and "too few for --set block_size=200" in line
    assert "--set vocab_size=3: the tokenizer has" in one_line_error(
        capsys, LM + ["--data-dir", str(text), "--set", "vocab_size=3", "--out", str(tmp_path / "c")])
    assert "--data parallel" in one_line_error(capsys, ["train", "translate", "--data", "toy", "--data-dir",
                                                        str(tmp_path), "--out", str(tmp_path / "d")])
    assert "--src en --tgt en: the source and target languages must differ" in one_line_error(
        capsys, ["train", "translate", "--src", "en", "--tgt", "en", "--out", str(tmp_path / "e")])
    assert "toy data: no training pair of non-empty sentences is shorter than --set max_len=2 tokens" in \
        one_line_error(capsys, ["train", "translate", "--set", "max_len=2", "--out", str(tmp_path / "f")])


# ----------------------------------------------------------------------------- item 12: files


def test_data_errors_are_one_line(capsys, tmp_path):
    assert one_line_error(capsys, ["train", "translate", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) \
        == f"pamtorch: error: {tmp_path / 'train.de'}: file not found (expected one train sentence per line, " \
           f"aligned with train.en)"
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (mnist / name).write_bytes(b"")
    assert one_line_error(capsys, VIT + ["--data-dir", str(mnist), "--out", str(tmp_path / "o2")]) \
        == f"pamtorch: error: {mnist / 'train-images-idx3-ubyte'}: empty file (expected an IDX file, gzip or raw)"


def test_unwritable_out_is_one_line(capsys, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    line = one_line_error(capsys, VIT + ["--steps", "1", "--out", str(tmp_path / "file" / "run")])
    assert line.startswith(f"pamtorch: error: --out {tmp_path / 'file' / 'run'}: cannot write there (Not a directory)")


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing meta", "not a dict", "other model"])
def test_damaged_checkpoint_is_one_line(capsys, tmp_path, damage):
    out = tmp_path / "run"
    ok(VIT + ["--steps", "4", "--stop-at", "2", "--out", str(out)])
    ckpt = out / "checkpoint.pt"
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "missing meta":
        c = torch.load(ckpt, weights_only=True)
        del c["meta"]
        torch.save(c, ckpt)
    elif damage == "not a dict":
        torch.save([1, 2], ckpt)
    else:
        c = torch.load(ckpt, weights_only=True)
        c["model"] = {"weight": torch.zeros(2)}
        torch.save(c, ckpt)
    line = one_line_error(capsys, VIT + ["--steps", "4", "--out", str(out), "--resume"])
    assert line.startswith(f"pamtorch: error: --resume: {ckpt} ")
    assert {"truncated": "is not a readable checkpoint", "empty": "is not a readable checkpoint",
            "missing meta": "missing keys: ['meta']", "not a dict": "holds a list",
            "other model": "does not fit this model"}[damage] in line


@pytest.mark.parametrize("failure", ["oserror", "torch"])
def test_full_disk_is_one_line_and_leaves_no_temp_file(capsys, tmp_path, monkeypatch, failure):
    def save(obj, f, *a, **k):
        f.write(b"partial")
        if failure == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    line = one_line_error(capsys, VIT + ["--steps", "2", "--out", str(out)])
    assert line.startswith(f"pamtorch: error: {out / 'checkpoint.pt'}: write failed (")
    assert ("No space left on device" if failure == "oserror" else "file write failed") in line
    assert not list(out.glob("*.tmp")) and not (out / "checkpoint.pt").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        cli(["train", "translate", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--debug"])
    with pytest.raises(UserError, match="file not found"):
        cli(["--debug", "train", "translate", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])


def test_console_errors_in_a_fresh_process(tmp_path):
    """The real command: one line and exit status 2; with --debug the traceback."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pamtorch.cli", "train", "translate", "--data-dir", str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == f"pamtorch: error: {tmp_path / 'train.de'}: file not found " \
                                             f"(expected one train sentence per line, aligned with train.en)\n"
    r = subprocess.run(cmd + ["--debug"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr and "DataError" in r.stderr
    r = subprocess.run([sys.executable, "-m", "pamtorch.recipes.train", "vit", "--batch-size", "0"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "argument --batch-size" in r.stderr


def test_bench_output_error_is_one_line(capsys, tmp_path):
    line = one_line_error(capsys, ["bench", "matmul", "--sizes", "8", "--reps", "1",
                                   "--output", str(tmp_path / "missing" / "B.md")])
    assert line.startswith(f"pamtorch: error: {tmp_path / 'missing' / 'B.md'}: No such file or directory")
    assert "a positive integer" in one_line_error(capsys, ["bench", "matmul", "--reps", "0"])
    line = one_line_error(capsys, ["bench", "step", "--recipe", "vit", "--no-append", "--train-args", "--bogus"])
    assert line.startswith("pamtorch: error: unrecognized arguments: --bogus")


# ----------------------------------------------------------------------------- item 6: --out holds a run


def test_out_holding_a_run_needs_resume_or_overwrite(capsys, tmp_path):
    out = tmp_path / "run"
    ok(VIT + ["--steps", "2", "--out", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = one_line_error(capsys, VIT + ["--steps", "2", "--out", str(out)])
    assert line == (f"pamtorch: error: --out {out} holds a run (checkpoint.pt, train_log.jsonl, eval_log.jsonl, "
                    f"metrics.json): add --resume to continue it, --overwrite to replace it, or choose another --out")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    ok(VIT + ["--steps", "3", "--seed", "1", "--out", str(out), "--overwrite"])
    assert [r["step"] for r in rows(out / "train_log.jsonl")] == [1, 2, 3]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["meta"]["seed"] == 1
    (tmp_path / "cmp" / "fp32").mkdir(parents=True)
    (tmp_path / "cmp" / "fp32" / "metrics.json").write_text("{}")
    assert f"--out {tmp_path / 'cmp' / 'fp32'} holds a run" in one_line_error(
        capsys, VIT + ["--steps", "2", "--compare", "fp32", "--out", str(tmp_path / "cmp")])


# ----------------------------------------------------------------------------- item 8: --resume settings


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """An lm run on a text file, stopped after step 2 of 4 (copied per test)."""
    root = tmp_path_factory.mktemp("stopped")
    (root / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 12)
    (root / "b.txt").write_text("the lazy dog sleeps while the quick fox runs. " * 12)
    argv = LM + ["--data-dir", str(root / "a.txt"), "--steps", "4", "--out", str(root / "run")]
    ok(argv + ["--stop-at", "2"])
    return root, argv


def _copy_run(stopped_run, tmp_path):
    import shutil

    root, argv = stopped_run
    shutil.copytree(root / "run", tmp_path / "run")
    return [a if a != str(root / "run") else str(tmp_path / "run") for a in argv], root


@pytest.mark.parametrize("change,key", [
    (["--lr", "0.01"], "lr"), (["--steps", "6"], "steps"), (["--label-smoothing", "0.1"], "label_smoothing"),
    (["--weight-decay", "0.5"], "weight_decay"), (["--clip", "0.5"], "clip"), (["--seed", "3"], "seed"),
    (["--min-lr", "1e-5"], "min_lr"), (["--warmup", "3"], "warmup_steps"), (["--batch-size", "4"], "batch_size"),
    (["--arith", "pam-matmul"], "arith"), (["DATA"], "data_dir"),
])
def test_resume_refuses_changed_settings(capsys, tmp_path, stopped_run, change, key):
    argv, root = _copy_run(stopped_run, tmp_path)
    if change == ["DATA"]:
        argv = [str(root / "b.txt") if a == str(root / "a.txt") else a for a in argv]
        change = []
    line = one_line_error(capsys, argv + change + ["--resume"])
    assert line.startswith(f"pamtorch: error: --resume: this run changes {key} ") and "--allow-changes" in line
    assert len(rows(tmp_path / "run" / "train_log.jsonl")) == 2  # nothing trained or truncated


def test_resume_refuses_a_changed_derivative(capsys, tmp_path):
    run = VIT + ["--arith", "pam-matmul", "--steps", "2", "--stop-at", "1", "--out", str(tmp_path)]
    ok(run)
    line = one_line_error(capsys, run + ["--derivative", "exact", "--resume"])
    assert "this run changes derivatives {'matmul': 'approx'} -> {'matmul': 'exact'}" in line
    ok(run + ["--derivative", "approx", "--resume"])  # the preset's own derivative is no change


def test_allow_changes_records_them(capsys, tmp_path, stopped_run):
    argv, _ = _copy_run(stopped_run, tmp_path)
    out = tmp_path / "run"
    ok(argv + ["--lr", "0.01", "--steps", "5", "--resume", "--allow-changes"])
    assert "--allow-changes: continuing at step 2 with steps 4 -> 5, lr 0.001 -> 0.01" in capsys.readouterr().err
    assert rows(out / "changes.jsonl") == [{"step": 2, "changes": {"steps": [4, 5], "lr": [0.001, 0.01]}}]
    m = json.loads((out / "metrics.json").read_text())
    assert m["setting_changes"] == rows(out / "changes.jsonl") and m["lr"] == 0.01 and m["completed"]
    assert [r["step"] for r in rows(out / "train_log.jsonl")] == [1, 2, 3, 4, 5]
    ok(argv + ["--lr", "0.01", "--steps", "5", "--resume"])  # the new settings are the run's now
    line = one_line_error(capsys, argv + ["--lr", "0.01", "--steps", "5", "--set", "n_embd=32", "--resume",
                                          "--allow-changes"])
    assert "the checkpoint fixes model_config" in line
    assert "the checkpoint fixes tokenizer" in one_line_error(
        capsys, argv + ["--lr", "0.01", "--steps", "5", "--tokenizer", "bpe", "--resume", "--allow-changes"])


# ----------------------------------------------------------------------------- items 10, 14: logs, temp files


def test_torn_log_line_and_stale_temp_files_do_not_stop_resume(capsys, tmp_path, stopped_run):
    argv, _ = _copy_run(stopped_run, tmp_path)
    out = tmp_path / "run"
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 2.7, "lr"')  # the write a power loss cut short
    stale = [out / "checkpoint.pt.x8k2j1.tmp", out / "metrics.json.123.abcd.tmp", out / "tokenizer.json.9.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    (out / "notes.tmp").write_text("not ours")
    capsys.readouterr()
    ok(argv + ["--resume"])
    err = capsys.readouterr().err
    assert f"{out / 'train_log.jsonl'}: dropped a torn last line" in err
    assert all(f"removed {p}, left by an interrupted write" in err for p in stale)
    assert not any(p.exists() for p in stale) and (out / "notes.tmp").exists()
    assert [r["step"] for r in rows(out / "train_log.jsonl")] == [1, 2, 3, 4]
    for name in ("checkpoint.pt", "metrics.json", "train_log.jsonl", "eval_log.jsonl", "tokenizer.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~_umask(), name


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_damaged_log_line_in_the_middle_is_one_line(capsys, tmp_path, stopped_run):
    argv, _ = _copy_run(stopped_run, tmp_path)
    log = tmp_path / "run" / "train_log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("garbage\n" + "\n".join(lines[1:]) + "\n")
    line = one_line_error(capsys, argv + ["--resume"])
    assert line.startswith(f"pamtorch: error: {log}: line 1 is not a log row")


def test_outputs_respect_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        ok(VIT + ["--steps", "1", "--out", str(tmp_path)])
    finally:
        os.umask(old)
    for name in ("checkpoint.pt", "metrics.json", "train_log.jsonl", "eval_log.jsonl"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    ok(VIT + ["--steps", "1", "--out", str(tmp_path), "--overwrite"])
    assert stat.S_IMODE((tmp_path / "checkpoint.pt").stat().st_mode) == 0o666 & ~old  # 0644 with umask 022


# ----------------------------------------------------------------------------- item 11: divergence


@pytest.mark.parametrize("arith", ["fp32", "pam-matmul", "pam-full", "paper"])
def test_divergence_stops_cleanly_in_every_arithmetic(capsys, tmp_path, arith):
    """lr 1e38: fp32's AdamW step overflows (a torch traceback before), the PA ones make inf parameters."""
    line = one_line_error(capsys, VIT + ["--arith", arith, "--steps", "3", "--eval-every", "1", "--warmup", "0",
                                         "--lr", "1e38", "--out", str(tmp_path)], code=1)
    assert line.startswith(f"pamtorch: error: training diverged ({arith}): ")
    assert line.endswith("at step 1 (learning rate 1e+38); stopping. No checkpoint was written") or \
        "optimizer step overflowed at step 1" in line, line
    assert not (tmp_path / "checkpoint.pt").exists()


def test_no_checkpoint_of_a_non_finite_optimizer_state(capsys, tmp_path, monkeypatch):
    """A checkpoint is written only when every model and optimizer tensor is finite."""
    step = torch.optim.AdamW.step
    calls = []

    def poisoned(self, *a, **k):
        out = step(self, *a, **k)
        calls.append(1)
        if len(calls) == 3:
            state = next(iter(self.state.values()))
            state["exp_avg_sq"].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    line = one_line_error(capsys, VIT + ["--steps", "4", "--ckpt-every", "1", "--out", str(tmp_path)], code=1)
    assert "non-finite values in optimizer exp_avg_sq of " in line and "at step 3" in line
    assert line.endswith(f"The last good checkpoint is {tmp_path / 'checkpoint.pt'} (step 2)")
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for s in ckpt["optimizer"]["state"].values()
                                     for v in s.values() if v.is_floating_point())


def test_non_finite_names_the_tensor():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert T.non_finite(T._model_and_optimizer_tensors(model, opt)) is None
    opt.state[model.bias]["exp_avg"][0] = float("nan")
    assert T.non_finite(T._model_and_optimizer_tensors(model, opt)) == "optimizer exp_avg of bias"
    with torch.no_grad():
        model.weight[1, 1] = float("-inf")
    assert T.non_finite(T._model_and_optimizer_tensors(model, opt)) == "weight"
