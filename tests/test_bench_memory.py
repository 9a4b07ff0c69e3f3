"""pamtorch bench step --memory: each variant's peak training memory, in a process of its own."""
import pytest

from pamtorch import bench
from pamtorch.cli import main

TINY_VIT = ("--set", "dim=32", "--set", "depth=1", "--batch-size", "16")


@pytest.fixture(scope="module")
def rows():
    return bench.bench_step_memory("vit", ("fp32", "pam-full", "pam-full@bfloat16"), steps=2, threads=1,
                                   train_args=TINY_VIT)


def test_memory_rows_are_positive_and_relative_to_the_first_variant(rows):
    assert [r["variant"] for r in rows] == ["fp32", "pam-full", "pam-full@bfloat16"]
    for r in rows:
        assert r["threads"] == 1 and r["batch_size"] == 16 and r["steps"] == 2
        assert r["setup_mib"] > 50 and r["process_peak_mib"] >= r["setup_mib"]
        assert r["train_mib"] > 0 and r["tensor_mib"] > 0
        # the steps keep gradients and two AdamW moments: at least three times the parameters
        assert r["tensor_mib"] >= 3 * r["params_mib"] > 0
        assert r["tensor_peak_in"].startswith(("aten::", "autograd::", "Optimizer."))
        # the forward saves float activations for backward (dropout masks are bool), in the
        # model's dtype
        assert r["saved_mib"]["bfloat16" if r["variant"].endswith("@bfloat16") else "float32"] > 0
    # the bfloat16 model: parameters cast in place, half the bytes
    assert rows[2]["params_mib"] == pytest.approx(rows[0]["params_mib"] / 2)
    assert rows[0]["x_first_train"] == rows[0]["x_first_tensor"] == 1.0
    assert rows[1]["x_first_tensor"] == pytest.approx(rows[1]["tensor_mib"] / rows[0]["tensor_mib"])
    assert rows[1]["x_first_train"] == pytest.approx(rows[1]["train_mib"] / rows[0]["train_mib"])


def test_memory_table_has_the_columns(rows):
    text = bench.format_memory_table(rows)
    assert "fresh process" in text and "high-water mark" in text
    head = [c.strip() for c in next(l for l in text.splitlines() if l.startswith("| recipe")).split("|")]
    for col in ("setup MiB", "training peak MiB", "x fp32", "tensor peak MiB", "saved for backward MiB",
                "process peak MiB"):
        assert col in head
    body = [l.split("|") for l in text.splitlines() if l.startswith("| vit ")]
    assert [c[5].strip() for c in body] == ["fp32", "pam-full", "pam-full@bfloat16"]
    for cells in body:
        assert float(cells[7]) > 0 and float(cells[9]) > 0  # training and tensor peaks, MiB


def one_line_error(capsys, argv):
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("pamtorch: error: "), err
    return err[0]


@pytest.mark.parametrize("argv, message", [
    (["--reps", "1"], "--reps 1: the memory measurement needs at least 2 steps"),
    (["--variants", "fp32,bogus"], "--arith bogus"),
    (["--variants", "fp32,pam-full@int8"], "the dtype after '@' must be bfloat16, float16 or autocast"),
    (["--train-args", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_memory_arguments_are_one_line(capsys, argv, message):
    line = one_line_error(capsys, ["bench", "step", "--memory", "--recipe", "vit", "--no-append", *argv])
    assert message in line


def test_memory_is_a_step_option(capsys):
    line = one_line_error(capsys, ["bench", "matmul", "--memory", "--no-append"])
    assert line == "pamtorch: error: --memory: only bench step measures memory (got bench matmul)"


@pytest.mark.parametrize("argv, message", [
    (["step", "--device", "tpu"], "--device tpu: expected auto, cpu, cuda or cuda:N"),
    (["step", "--device", "cuda:99"], "--device cuda:99: no such CUDA device here"),
    (["matmul", "--device", "cuda"], "--device cuda: only bench step (without --memory) runs on another device"),
    (["step", "--memory", "--device", "cuda"], "--device cuda: only bench step (without --memory)"),
])
def test_bad_bench_devices_are_one_line(capsys, argv, message):
    line = one_line_error(capsys, ["bench", *argv, "--recipe", "encoder", "--no-append"])
    assert message in line, line


def test_step_rows_name_their_device_only_off_the_cpu():
    rows = bench.bench_step("encoder", ("fp32", "pam-matmul"), reps=1, threads=1, device="cpu")
    assert [r["device"] for r in rows] == ["cpu", "cpu"]
    assert "device" not in bench.format_step_table(rows).splitlines()[0]
    shown = bench.format_step_table([dict(r, device="cuda:0") for r in rows]).splitlines()
    assert "| device |" in shown[0] and "| cuda:0 |" in shown[2] and shown[1].count("---") == 10
