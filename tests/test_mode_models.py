"""Stock transformers train multiplication-free under pamtorch.mode, and audit so."""
import pytest
import torch
from torch import nn

import pamtorch
from pamtorch.config import Config


class TinyViT(nn.Module):
    """A small ViT from stock nn modules: conv patch embedding, cls token, GELU, pre-norm."""

    def __init__(self, img=8, patch=2, dim=32, depth=2, heads=2, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def vit_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def seq2seq_batch(seed=0, vocab=20):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(1, vocab, (8, 7), generator=g)
    return src, src.flip(1)   # learn to reverse


class TinySeq2Seq(nn.Module):
    def __init__(self, vocab=20, dim=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.tf = nn.Transformer(dim, 2, 1, 1, 64, dropout=0.1, batch_first=True)
        self.out = nn.Linear(dim, vocab)

    def forward(self, src, tgt_in):
        mask = self.tf.generate_square_subsequent_mask(tgt_in.shape[1])
        h = self.tf(self.emb(src), self.emb(tgt_in), tgt_mask=mask, tgt_is_causal=True)
        return self.out(h)


def make(kind):
    torch.manual_seed(0)
    if kind == "vit":
        model = TinyViT()
        x, y = vit_batch()

        def loss_fn(m, lossf):
            return lossf(m(x), y)
    else:
        model = TinySeq2Seq()
        src, tgt = seq2seq_batch()
        tgt_in = torch.cat([torch.zeros_like(tgt[:, :1]), tgt[:, :-1]], 1)

        def loss_fn(m, lossf):
            return lossf(m(src, tgt_in).reshape(-1, 20), tgt.reshape(-1))
    return model, loss_fn


def train_step(model, opt, lossf, loss_fn, cfg):
    with pamtorch.mode(cfg):
        loss = loss_fn(model, lossf)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return loss.item()


@pytest.mark.parametrize("kind", ["vit", "seq2seq"])
@pytest.mark.parametrize("cfg_name", ["paper_exact_loss", "full"])
def test_stock_transformer_trains_and_audits_multiplication_free(kind, cfg_name):
    cfg = getattr(Config, cfg_name)()
    model, loss_fn = make(kind)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    lossf = nn.CrossEntropyLoss(label_smoothing=0.1)
    report = pamtorch.audit(train_step, model, opt, lossf, loss_fn, cfg)
    report.assert_multiplication_free()
    for phase in ("forward", "backward", "optimizer"):
        assert sum(report.pa[phase].values()) > 0
    losses = [train_step(model, opt, lossf, loss_fn, cfg) for _ in range(12)]
    assert all(l == l and abs(l) < 1e4 for l in losses)
    assert sum(losses[-3:]) < sum(losses[:3]), losses


class Block(nn.Module):
    """Linear, LayerNorm, GELU, attention and a classifier: every converted module kind."""

    def __init__(self, d=16):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.act = nn.GELU()
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.act(self.norm(h)).sum(1))


@pytest.mark.parametrize("cfg_name", ["paper_exact_loss", "full", "matmul_only"])
def test_converted_model_and_mode_give_the_same_gradients(cfg_name):
    cfg = getattr(Config, cfg_name)()
    torch.manual_seed(0)
    stock = Block()
    converted = pamtorch.convert(Block(), cfg)
    converted.load_state_dict(stock.state_dict())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 5, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
    with pamtorch.mode(cfg):
        loss_a = nn.functional.cross_entropy(stock(x), y)
        loss_a.backward()
    loss_b = pamtorch.nn.CrossEntropyLoss(config=cfg)(converted(x), y)
    loss_b.backward()
    assert torch.equal(loss_a, loss_b)
    # the same PA ops in both; only the order of float sums in bias and residual
    # gradients differs (autograd's formulas against pamtorch's), an ulp at most
    for (name, p), q in zip(stock.named_parameters(), converted.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6), name


def test_nested_tensor_encoder_with_padding_mask_runs_the_routed_math_path():
    """nn.TransformerEncoder(enable_nested_tensor=True) in eval with a padding mask would
    take torch's fused fast path (nested tensors, _transformer_encoder_layer_fwd); under
    the mode the fast path is off, so the stock math path runs, routed op by op."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(3, 5, 16)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 3:] = True
    fast = torch.backends.mha.get_fastpath_enabled()
    out = []
    with torch.no_grad():
        ref = enc(x, src_key_padding_mask=mask)

        def run():
            with pamtorch.mode(pamtorch.Config.full()):
                out.append(enc(x, src_key_padding_mask=mask))
        report = pamtorch.audit(run, model=enc)
    assert torch.backends.mha.get_fastpath_enabled() == fast      # restored
    report.assert_multiplication_free()
    got, keep = out[-1], ~mask
    rel = ((got - ref)[keep].norm() / ref[keep].norm()).item()
    assert 0 < rel < 0.15, rel


def _rotary(x, freqs):
    """Meta-Llama-style rotary embedding: pairs as complex numbers times unit phasors."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs).flatten(-2)


def test_view_as_complex_rotary_embedding_is_pa_forward_and_backward():
    torch.manual_seed(0)
    t, d = 6, 8
    theta = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.polar(torch.ones(t, d // 2), torch.outer(torch.arange(t).float(), theta))
    x = torch.randn(2, t, d, requires_grad=True)
    w = torch.randn(2, t, d)
    (_rotary(x, freqs) * w).sum().backward()
    ref_y, ref_g = _rotary(x, freqs).detach(), x.grad.clone()
    x.grad = None
    out = []

    def step():
        with pamtorch.mode(Config.full()):
            y = _rotary(x, freqs)
            (y * w).sum().backward()
            out.append(y.detach())

    report = pamtorch.audit(step)
    report.assert_multiplication_free()
    assert report.pa["forward"]["mul"] >= 1          # the complex product ran PA
    y = out[0]
    assert 0 < ((y - ref_y).norm() / ref_y.norm()).item() < 0.05
    assert 0 < ((x.grad - ref_g).norm() / ref_g.norm()).item() < 0.15
