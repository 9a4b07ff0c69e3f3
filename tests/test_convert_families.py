"""pamtorch.convert shares the mode's op table: for every converted module family the
converted module gives bit-equal outputs and gradients to the stock module under the mode."""
import copy
import logging

import pytest
import torch
from torch import nn

import pamtorch
from pamtorch.config import Config
from pamtorch.convert import ConvertedModule, convert

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402


class MyLinear(nn.Linear):
    """A user subclass: its forward override must survive conversion."""

    def forward(self, x):
        return super().forward(x) + 1.0


def _seq_first(out):
    return out[0] if isinstance(out, tuple) else out


FAMILIES = {
    "linear": (lambda: nn.Linear(6, 5), (3, 6)),
    "linear-subclass": (lambda: MyLinear(6, 5), (3, 6)),
    "bilinear": (lambda: nn.Bilinear(4, 4, 3), None),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 7)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 7, 7)),
    "conv2d-depthwise": (lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4), (2, 4, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 3, padding=1), (2, 2, 4, 4, 4)),
    "convtranspose2d": (lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1), (2, 3, 4, 4)),
    "layernorm": (lambda: nn.LayerNorm(6), (3, 6)),
    "rmsnorm": (lambda: nn.RMSNorm(6), (3, 6)),
    "batchnorm2d": (lambda: nn.BatchNorm2d(3), (4, 3, 5, 5)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (2, 4, 5, 5)),
    "instancenorm2d": (lambda: nn.InstanceNorm2d(3, affine=True), (2, 3, 5, 5)),
    "multiheadattention": (lambda: nn.MultiheadAttention(8, 2, batch_first=True), None),
    "lstm": (lambda: nn.LSTM(4, 5, batch_first=True), (2, 3, 4)),
    "gru": (lambda: nn.GRU(4, 5, batch_first=True), (2, 3, 4)),
    "gelu": (lambda: nn.GELU(), (3, 6)),
    "tanh": (lambda: nn.Tanh(), (3, 6)),
    "silu": (lambda: nn.SiLU(), (3, 6)),
    "softmax": (lambda: nn.Softmax(-1), (3, 6)),
    "dropout": (lambda: nn.Dropout(0.3), (3, 6)),
    "avgpool2d": (lambda: nn.AvgPool2d(2), (2, 3, 6, 6)),
    "adaptiveavgpool2d": (lambda: nn.AdaptiveAvgPool2d(1), (2, 3, 5, 5)),
    "upsample-bilinear": (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), (1, 2, 3, 3)),
    "hf-conv1d": (lambda: Conv1D(5, 6), (3, 6)),
    "hf-llama-rmsnorm": (lambda: LlamaRMSNorm(6), (3, 6)),
}


def _inputs(name, shape, g):
    if name == "bilinear":
        return (torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g))
    if name == "multiheadattention":
        q = torch.randn(2, 3, 8, generator=g)
        return (q, q.clone(), q.clone())
    return (torch.randn(*shape, generator=g),)


def _run(mod, inputs, w, cfg, whole_under_mode):
    xs = [x.clone().requires_grad_() for x in inputs]
    torch.manual_seed(1)
    if whole_under_mode:
        with pamtorch.mode(cfg):
            y = _seq_first(mod(*xs))
            (y * w).sum().backward()
    else:
        y = _seq_first(mod(*xs))
        with pamtorch.mode(cfg):
            (y * w).sum().backward()
    grads = [x.grad for x in xs] + [p.grad for p in mod.parameters()]
    return y.detach(), grads


@pytest.mark.parametrize("cfg_name", ["full", "paper-exact-loss"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_converted_family_equals_stock_under_mode(name, cfg_name):
    torch.set_num_threads(1)
    build, shape = FAMILIES[name]
    cfg = Config.from_name(cfg_name)
    torch.manual_seed(0)
    stock = build()
    conv = convert(copy.deepcopy(stock), cfg)
    assert isinstance(conv, ConvertedModule) and isinstance(conv, type(stock))
    g = torch.Generator().manual_seed(0)
    inputs = _inputs(name, shape, g)
    with torch.no_grad():
        probe = _seq_first(stock(*inputs))
    w = torch.randn(probe.shape, generator=g)
    y_ref, g_ref = _run(stock, inputs, w, cfg, True)
    y, g_got = _run(conv, inputs, w, cfg, False)
    assert torch.equal(y, y_ref)
    for a, b in zip(g_got, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    # the converted module runs PA even outside the mode: it differs from exact arithmetic
    with torch.no_grad():
        exact = _seq_first(stock(*inputs))
    if name not in ("dropout",):
        assert not torch.equal(y, exact)


def test_report_names_unknown_modules_with_parameters(caplog):
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.s

    m = nn.Sequential(nn.Linear(4, 4), Scale(), nn.ReLU())
    with caplog.at_level(logging.INFO, logger="pamtorch.convert"):
        convert(m, module_filter_fn=lambda mod, fqn: fqn != "0")
    rep = m.pamtorch_conversion
    assert rep.left["0"] == "module_filter_fn returned False"
    assert "not a known module family" in rep.left["1"] and "Scale" in rep.left["1"]
    assert "2" not in rep.left and "2" not in rep.converted     # ReLU: no multiplication, nothing to do
    assert "left 1: " in caplog.text


def test_converted_module_keeps_state_dict_and_subclass_forward():
    torch.manual_seed(0)
    m = MyLinear(3, 2)
    keys, ids = list(m.state_dict()), [id(p) for p in m.parameters()]
    convert(m)
    assert list(m.state_dict()) == keys and [id(p) for p in m.parameters()] == ids
    x = torch.randn(4, 3)
    with pamtorch.mode(Config.paper()):
        ref = nn.Linear.forward(m, x) + 1.0
    assert torch.equal(m(x), ref)


def test_timm_norm_classes_are_known_by_module_and_name():
    """timm cannot be imported here (see docs/models.md); its norm classes are matched by
    their module and class name, as HF's are. A stand-in with timm's module path and name (a
    LayerNorm2d, not a subclass of any torch norm) is converted and runs PA; another timm
    class of an unknown name is not."""
    class LayerNorm2d(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.randn(c)), nn.Parameter(torch.randn(c))

        def forward(self, x):
            y = nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias)
            return y.permute(0, 3, 1, 2)

    class Custom(nn.Module):
        def forward(self, x):
            return x

    LayerNorm2d.__module__ = "timm.layers.norm"
    Custom.__module__ = "timm.layers.other"
    m = nn.Sequential(LayerNorm2d(3), Custom())
    convert(m, Config.full())
    assert isinstance(m[0], ConvertedModule) and not isinstance(m[1], ConvertedModule)
    x = torch.randn(2, 3, 4, 4)
    with pamtorch.mode(Config.full()):
        ref = LayerNorm2d.forward(m[0], x)
    got = m[0](x)
    assert torch.equal(got, ref) and not torch.equal(got, LayerNorm2d.forward(m[0], x))
