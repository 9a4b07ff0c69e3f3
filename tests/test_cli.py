"""The pamtorch command line: check and bench."""
import pytest

from pamtorch.cli import main


def test_check_prints_the_error_table_and_kernel_verdict(capsys):
    assert main(["check", "-n", "5000"]) == 0
    out = capsys.readouterr().out
    for op in ("mul", "mul offset=1.0552", "div", "exp", "log", "sqrt", "rsqrt", "pow p=3"):
        assert f"| {op} " in out
    for dtype in ("float32", "bfloat16", "float16"):
        assert dtype in out
    assert out.count("agrees with the elementwise reference") == 2
    mul32 = next(l for l in out.splitlines() if l.startswith("| mul ") and "float32" in l)
    mean = float(mul32.split("|")[3].strip().rstrip("%"))
    assert -4.5 < mean < -3.2   # Mitchell's mean error on uniform mantissas, about -3.85 %


def test_bench_matmul_appends_a_table(tmp_path, capsys):
    out_file = tmp_path / "B.md"
    assert main(["bench", "matmul", "--sizes", "64", "--reps", "1", "--output", str(out_file)]) == 0
    text = out_file.read_text()
    assert "pamtorch bench matmul" in text or "bench matmul" in text
    assert "Machine:" in text and "64" in text


def test_bench_elementwise_appends_a_table(tmp_path, capsys):
    out_file = tmp_path / "B.md"
    assert main(["bench", "elementwise", "--sizes", "4096", "--reps", "1", "--output", str(out_file)]) == 0
    text = out_file.read_text()
    assert "bench elementwise" in text and "Machine:" in text
    rows = [line for line in text.splitlines() if line.startswith("| mul ") or line.startswith("| exp ")]
    assert len(rows) == 3  # mul contiguous, mul row broadcast, exp
    assert all(float(r.split("|")[6]) > 0 for r in rows)


def test_bench_step_times_each_arithmetic(tmp_path):
    out_file = tmp_path / "B.md"
    assert main(["bench", "step", "--recipe", "vit", "--variants", "fp32,pam-full", "--reps", "1",
                 "--output", str(out_file), "--train-args", "--set", "dim=16", "--set", "depth=1",
                 "--batch-size", "8"]) == 0
    rows = [line.split("|") for line in out_file.read_text().splitlines() if line.startswith("| vit ")]
    assert [r[5].strip() for r in rows] == ["fp32", "pam-full"]
    assert float(rows[0][7]) == 1.0 and float(rows[1][7]) > 0


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit):
        main(["frobnicate"])
