"""pamtorch.convert: in-place module swaps, state_dict compatibility, training."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pamtorch.nn.functional as P
from pamtorch.config import Config
from pamtorch.convert import ConvertedModule, convert


def _pa(mod, cls):
    """``mod`` is a converted ``cls`` (a mode region that is still a ``cls``)."""
    return isinstance(mod, ConvertedModule) and isinstance(mod, cls)


class Classifier(nn.Module):
    def __init__(self, d=16, layers=1, classes=3, activation="gelu"):
        super().__init__()
        self.emb = nn.Linear(8, d)
        layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.1, activation=activation,
                                           batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x, mask=None):
        return self.head(self.norm(self.enc(self.emb(x), src_key_padding_mask=mask)).mean(1))


def _data(n=16, L=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, L, 8, generator=g)
    y = (x[:, :, 0].sum(1) > 0).long() + (x[:, 0, 1] > 0.5).long()
    return x, y


def test_convert_swaps_in_place_and_keeps_parameters():
    torch.manual_seed(0)
    m = Classifier()
    params = {n: p for n, p in m.named_parameters()}
    keys = list(m.state_dict().keys())
    out = convert(m)
    assert out is m
    assert {n: id(p) for n, p in m.named_parameters()} == {n: id(p) for n, p in params.items()}
    assert list(m.state_dict().keys()) == keys
    layer = m.enc.layers[0]
    assert _pa(m.emb, nn.Linear) and _pa(m.head, nn.Linear)
    assert _pa(layer.self_attn, nn.MultiheadAttention)
    assert _pa(layer.linear1, nn.Linear) and _pa(layer.norm1, nn.LayerNorm)
    assert _pa(layer.dropout, nn.Dropout) and _pa(layer.activation, nn.GELU)
    assert not isinstance(layer.self_attn.out_proj, ConvertedModule)   # read through the attention
    assert layer.activation_relu_or_gelu == 0
    assert m.emb.pamtorch_config == Config.paper()
    assert set(m.pamtorch_conversion.converted) >= {"emb", "head", "norm", "enc.layers.0.self_attn"}
    # root module and the other families
    lin = convert(nn.Linear(3, 4), Config.full())
    assert _pa(lin, nn.Linear) and lin.pamtorch_config == Config.full()
    seq = convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Softmax(1), nn.RMSNorm(4)))
    assert [_pa(s, c) for s, c in zip(seq, [nn.Conv2d, nn.GELU, nn.Softmax, nn.RMSNorm])] == [True] * 4
    with pytest.raises(TypeError):
        convert(nn.Linear(2, 2), config="paper")


def test_module_filter_fn():
    m = Classifier()
    seen = []

    def keep(mod, fqn):
        seen.append(fqn)
        return fqn != "head" and not fqn.endswith("norm1")

    convert(m, module_filter_fn=keep)
    assert type(m.head) is nn.Linear and _pa(m.emb, nn.Linear)
    assert type(m.enc.layers[0].norm1) is nn.LayerNorm
    assert _pa(m.enc.layers[0].norm2, nn.LayerNorm)
    assert m.pamtorch_conversion.left["head"] == "module_filter_fn returned False"
    assert "enc.layers.0.self_attn" in seen and "head" in seen


def test_state_dict_round_trip_between_stock_and_converted():
    torch.manual_seed(0)
    stock = Classifier()
    conv = convert(Classifier())
    conv.load_state_dict(stock.state_dict())
    for (k1, v1), (k2, v2) in zip(stock.state_dict().items(), conv.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    back = Classifier()
    back.load_state_dict(conv.state_dict())
    x, _ = _data(4)
    stock.eval(), conv.eval()
    with torch.no_grad():
        ref, out = stock(x), conv(x)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.3      # PA arithmetic throughout, same weights
    assert torch.equal(back.eval()(x), stock(x))


def test_eval_fast_path_is_not_taken(monkeypatch):
    """In eval/no-grad a stock encoder layer would call the fused kernel with its weights,
    bypassing every converted module; converted layers must not."""
    m = convert(Classifier())
    m.eval()

    def boom(*a, **k):
        raise AssertionError("fast path taken")

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", boom)
    x, _ = _data(2)
    with torch.no_grad():
        out = m(x)
    assert torch.isfinite(out).all()


def test_pa_false_kinds_keep_torch_numerics():
    torch.manual_seed(0)
    stock = Classifier()
    conv = convert(Classifier(), Config.ablation())   # nothing PA
    conv.load_state_dict(stock.state_dict())
    stock.eval(), conv.eval()
    x, _ = _data(4)
    with torch.enable_grad():   # keep the stock model off its fast path too
        assert torch.allclose(conv(x), stock(x), atol=1e-5)


def test_converted_transformer_trains():
    torch.manual_seed(0)
    m = convert(Classifier())
    m.train()
    x, y = _data(8)
    mask = torch.zeros(8, 4, dtype=torch.bool)
    mask[:2, -1] = True   # some padded keys
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = P.cross_entropy(m(x, mask), y)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_converted_relu_layer_and_causal_mask_runs():
    m = convert(Classifier(activation="relu"))
    assert m.enc.layers[0].activation is F.relu
    x, _ = _data(2)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    out = m.enc(m.emb(x), mask=causal, is_causal=True)
    out.sum().backward()
    assert m.emb.weight.grad is not None
