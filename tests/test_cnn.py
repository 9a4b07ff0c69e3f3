"""``pamtorch train cnn``: the pre-activation ResNet and VGG models, their arithmetics (pam-conv keeps
BatchNorm exact, pam-full makes it PA), the light augmentation, smoke runs on the built-in digits,
Fashion-MNIST's and CIFAR-10's formats, exact --resume with BatchNorm statistics, and one-line errors."""
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from pamtorch.recipes import cnn
from pamtorch.recipes import data as D
from pamtorch.recipes import train as T
from test_data import write_cifar, write_mnist

TINY = ["cnn", "--set", "widths=4,8,8", "--set", "blocks=1", "--batch-size", "16", "--no-progress", "--threads", "1"]


def train(argv):
    assert T.main(list(argv) + ["--debug"]) == 0


def losses(out):
    return [r["loss"] for r in T.read_jsonl(out / "train_log.jsonl")]


def metrics(out):
    return json.loads((out / "metrics.json").read_text())


def one_line_error(capsys, argv):
    capsys.readouterr()
    assert T.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pamtorch: error: "), err
    return err.strip()


# ----------------------------------------------------------------------------- models


def test_resnet20_is_the_cifar_preact_resnet():
    cfg = dataclasses.replace(cnn.PRESETS["resnet20"], in_chans=3, num_classes=10)
    model = cnn.build(cfg)
    convs3 = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs3) == 19  # the stem + 2 per block x 9 blocks: with the classifier, 20 layers
    assert [m.out_channels for m in convs3[1::6]] == [16, 32, 64]  # the first block of each stage
    assert [m.stride for m in convs3 if m.stride != (1, 1)] == [(2, 2), (2, 2)]
    # pre-activation: a block starts with BatchNorm and ReLU, the net ends with BatchNorm-ReLU-pool-linear
    assert isinstance(model.blocks[0].bn1, nn.BatchNorm2d) and isinstance(model.head[0], nn.BatchNorm2d)
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.29e6  # ResNet-20: 0.27M
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(isinstance(m, cnn.PreActBlock) for m in cnn.build(
        dataclasses.replace(cnn.PRESETS["resnet110"], in_chans=3, num_classes=10)).modules()) == 54  # 6n+2, n=18


def test_vgg13_is_the_papers_and_vgg_is_small_with_batchnorm():
    v13 = cnn.build(dataclasses.replace(cnn.PRESETS["vgg13"], in_chans=3, num_classes=10))
    convs = [m for m in v13.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [64, 64, 128, 128, 256, 256, 512, 512, 512, 512]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in v13.modules())  # "VGG13 without BN"
    assert [m.out_features for m in v13.head if isinstance(m, nn.Linear)] == [512, 512, 10]  # num_features=512
    small = cnn.build(dataclasses.replace(cnn.PRESETS["vgg"], in_chans=3, num_classes=10))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in small.modules()) == 6
    assert sum(p.numel() for p in small.parameters()) < 0.3e6


@pytest.mark.parametrize("preset", list(cnn.PRESETS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_every_net_takes_small_and_grey_images(preset, shape):
    cfg = dataclasses.replace(cnn.PRESETS[preset], in_chans=shape[0], num_classes=7)
    if preset in ("resnet110", "vgg13"):  # the structure is what matters here, not the width or depth
        cfg = dataclasses.replace(cfg, blocks=1, widths=",".join(["4"] * len(cfg.stage_widths)),
                                  mlp_dim=8 if cfg.mlp_dim else 0)
    model = cnn.build(cfg)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_pam_conv_keeps_batchnorm_exact_and_pam_full_makes_it_pa():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    x = torch.randn(5, 3, 6, 6)
    h = torch.randn(5, 4, 6, 6)
    ref_conv, ref_bn = conv(x), bn(h)
    out = {}
    for arith in ("pam-conv", "pam-full"):
        with T.arith_context(arith)():
            out[arith] = conv(x), bn(h)
    assert torch.equal(out["pam-conv"][1], ref_bn)          # BatchNorm exact in the paper's CNN variant
    assert not torch.equal(out["pam-full"][1], ref_bn)      # and PA in pam-full
    for arith in out:  # the convolution is PA in both: close to the float result, not equal
        assert not torch.equal(out[arith][0], ref_conv)
        assert torch.allclose(out[arith][0], ref_conv, rtol=0.15, atol=0.15)
    cfg = T.arith_config("pam-conv")
    assert cfg.matmul.pa and not any(cfg.kind(k).pa for k in ("norm", "loss", "optimizer", "elementwise"))
    assert T.arith_config("pam-conv", "exact").matmul.derivative == "exact"


# ----------------------------------------------------------------------------- augmentation


def test_augment_is_a_padded_crop_and_flip_per_image():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1
    g = torch.Generator().manual_seed(3)
    out = D.augment_images(x.repeat(16, 1, 1, 1), g)
    assert out.shape == (32, 3, 8, 8)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))  # pad = side/8 = 1
    flips = 0
    for i, o in enumerate(out):
        src = padded[i % 2]
        crops = {(dy, dx, f) for dy in range(3) for dx in range(3) for f in (0, 1)
                 if torch.equal(o, src[:, dy:dy + 8, dx:dx + 8].flip(-1) if f else src[:, dy:dy + 8, dx:dx + 8])}
        assert crops, i  # every output is a crop of the zero-padded image, maybe mirrored
        flips += all(f for _, _, f in crops)
    assert 4 <= flips <= 28
    assert torch.equal(D.augment_images(x, torch.Generator().manual_seed(5)),
                       D.augment_images(x, torch.Generator().manual_seed(5)))
    assert D.augment_images(torch.zeros(1, 3, 32, 32), g).shape == (1, 3, 32, 32)


def test_augmentation_default_is_on_for_cifar10_only(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", n=20)
    for data_dir, augment, expected in ((None, None, False), (str(tmp_path), None, True),
                                        (str(tmp_path), False, False), (None, True, True)):
        args = SimpleNamespace(recipe="cnn", preset=None, set=["widths=4,4,4", "blocks=1"], dropout=None, lr=None,
                               batch_size=None, weight_decay=None, warmup=None, label_smoothing=None, clip=None,
                               data=None, data_dir=data_dir, augment=augment)
        task = cnn.Task(args, T.resolve_hparams(args, cnn), None, torch.device("cpu"))
        assert task.augment is expected, (data_dir, augment)
        x, _ = task.batch(0, 8, seed=0)
        x2, _ = task.batch(0, 8, seed=0)
        assert torch.equal(x, x2)  # a pure function of (seed, step) either way
        sampler_x = task.data.train_x[task.sampler(0)]
        assert torch.equal(x, sampler_x) is (not expected)


# ----------------------------------------------------------------------------- runs


def test_cnn_smoke_in_each_arithmetic(tmp_path):
    """A few steps of ResNet and VGG on the built-in digits under fp32, pam-conv and pam-full."""
    for arith in ("fp32", "pam-conv", "pam-full"):
        out = tmp_path / arith
        train(TINY + ["--arith", arith, "--steps", "3", "--eval-every", "3", "--out", str(out)])
        m = metrics(out)
        assert m["completed"] and m["arith"] == arith and m["optimizer"] == "sgd" and m["augment"] is False
        assert 1.0 < m["valid_loss"] < 4.0 and 0 <= m["accuracy"] <= 1 and m["macs_per_step"] > 0
        assert all(1.0 < v < 4.0 for v in losses(out))
    state = torch.load(tmp_path / "pam-full" / "checkpoint.pt", weights_only=True)["optimizer"]
    assert state["param_groups"][0]["nesterov"] and "momentum_buffer" in next(iter(state["state"].values()))
    train(TINY + ["--set", "model=vgg", "--arith", "pam-conv", "--optimizer", "adamw", "--steps", "2",
                  "--eval-every", "2", "--out", str(tmp_path / "vgg")])
    assert metrics(tmp_path / "vgg")["model_config"]["model"] == "vgg"
    assert "exp_avg" in next(iter(torch.load(tmp_path / "vgg" / "checkpoint.pt", weights_only=True)
                                   ["optimizer"]["state"].values()))
    assert metrics(tmp_path / "pam-conv")["derivatives"] == {"matmul": "approx"}


def test_cnn_presets_carry_the_papers_training_settings(tmp_path):
    args = SimpleNamespace(recipe="cnn", preset=None, set=[], dropout=None, lr=None, batch_size=None,
                           weight_decay=None, warmup=None, label_smoothing=None, clip=None)
    hp = T.resolve_hparams(args, cnn)
    assert (hp.preset, hp.optimizer, hp.momentum, hp.lr, hp.batch_size, hp.weight_decay) == \
        ("resnet20", "sgd", 0.9, 0.2, 256, 2e-4)
    assert (hp.warmup_epochs, hp.min_lr, hp.label_smoothing, hp.clip) == (5, 1e-5, 0.0, 0.0)
    hp = T.resolve_hparams(SimpleNamespace(**{**vars(args), "preset": "vgg13", "lr": 0.01}), cnn)
    assert (hp.lr, hp.batch_size, hp.weight_decay) == (0.01, 128, 5e-4)  # the command line wins
    # 5 warmup epochs in steps: digits has 1437 training images, 89 steps per epoch at batch 16
    train(TINY + ["--steps", "2", "--eval-every", "2", "--out", str(tmp_path)])
    assert metrics(tmp_path)["warmup_steps"] == 5 * (1437 // 16)


def test_cnn_on_fashion_mnist_and_cifar10_formats(tmp_path):
    (tmp_path / "fmnist").mkdir()
    write_mnist(tmp_path / "fmnist", n_train=40, n_test=10, size=28)
    train(TINY + ["--data-dir", str(tmp_path / "fmnist"), "--steps", "2", "--eval-every", "2",
                  "--out", str(tmp_path / "a")])
    m = metrics(tmp_path / "a")
    assert m["model_config"]["in_chans"] == 1 and m["model_config"]["num_classes"] == 3 and m["augment"] is False
    write_cifar(tmp_path / "c" / "cifar-10-batches-py", n=40)
    train(TINY + ["--data-dir", str(tmp_path / "c"), "--steps", "2", "--eval-every", "2", "--arith", "pam-conv",
                  "--out", str(tmp_path / "b")])
    m = metrics(tmp_path / "b")
    assert m["model_config"]["in_chans"] == 3 and m["augment"] is True and m["valid_loss"] > 0


def test_cnn_resume_is_exact_with_batchnorm_and_augmentation(tmp_path):
    base = TINY + ["--steps", "8", "--eval-every", "3", "--augment", "--dropout", "0.1"]
    train(base + ["--out", str(tmp_path / "full")])
    train(base + ["--out", str(tmp_path / "part"), "--stop-at", "4"])
    train(base + ["--out", str(tmp_path / "part"), "--resume"])
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["model"]
    assert any("running_mean" in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(tmp_path / "full")["valid_loss"] == metrics(tmp_path / "part")["valid_loss"]


def test_cnn_compare(tmp_path):
    train(TINY + ["--steps", "2", "--eval-every", "2", "--compare", "fp32,pam-conv", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "compare.json").read_text())
    assert set(res) == {"fp32", "pam-conv"} and all("valid_loss" in r for r in res.values())
    assert res["pam-conv"]["energy_mj_per_step_estimate"] < res["fp32"]["energy_mj_per_step_estimate"]
    assert "| pam-conv |" in (tmp_path / "compare.md").read_text()


@pytest.mark.parametrize("extra,expected", [
    (["--set", "model=alexnet"], "--set model=alexnet: expected resnet or vgg"),
    (["--set", "widths=16,x"], "--set widths=16,x: expected positive integers separated by commas"),
    (["--set", "widths=0,4"], "--set widths=0,4: expected positive integers"),
    (["--set", "blocks=0"], "--set blocks=0: expected an integer >= 1"),
    (["--set", "batchnorm=false"], "--set batchnorm=false: only model=vgg can leave out BatchNorm"),
    (["--set", "mlp_dim=8"], "--set mlp_dim=8: only model=vgg"),
    (["--set", "in_chans=3"], "--set in_chans=3: the images have 1 channels"),
    (["--preset", "resnet18"], "--preset resnet18: unknown preset for cnn (expected one of resnet20, resnet110"),
    (["--max-tokens", "100"], "--max-tokens 100: only the translate recipe batches by tokens"),
    (["--arith", "pam-conf"], "--arith pam-conf: "),
])
def test_cnn_mistakes_are_one_line(capsys, tmp_path, extra, expected):
    line = one_line_error(capsys, TINY + ["--steps", "1", "--out", str(tmp_path / "o")] + extra)
    assert expected in line, line


def test_augment_is_refused_outside_the_image_recipes(capsys, tmp_path):
    line = one_line_error(capsys, ["lm", "--augment", "--steps", "1", "--out", str(tmp_path)])
    assert "--augment: only the image recipes (vit, cnn) augment their data" in line
