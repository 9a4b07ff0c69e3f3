"""The recipe models: shapes, presets, causality, tied embeddings, decoding, MAC counting."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from pamtorch.recipes import lm, translate, vit
from pamtorch.recipes.data import UserError
from pamtorch.recipes.train import (arith_context, count_macs, energy_estimate_mj, lr_at, pa_divide,
                                    resolve_hparams)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def args_for(recipe, **kw):
    base = dict(recipe=recipe, preset=None, set=[], dropout=None, lr=None, batch_size=None, weight_decay=None,
                warmup=None, label_smoothing=None, clip=None, data=None, data_dir=None, resume=False,
                src="de", tgt="en", beam=2, eval_sentences=20, vocab_size=None, tokenizer="char")
    base.update(kw)
    return SimpleNamespace(**base)


# ----------------------------------------------------------------------------- vit


def test_vit_tiny_forward_and_backward():
    cfg = dataclasses.replace(vit.PRESETS["tiny"], img_size=8, patch_size=2, in_chans=1, num_classes=10)
    model = vit.ViT(cfg)
    out = model(torch.randn(5, 1, 8, 8))
    assert out.shape == (5, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert isinstance(model.patch_embed, nn.Conv2d) and isinstance(model.blocks[0].attn, nn.MultiheadAttention)


def test_vit_deit_tiny_is_the_paper_size():
    cfg = dataclasses.replace(vit.PRESETS["deit-tiny"], in_chans=3, num_classes=1000)
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.mlp_dim, cfg.patch_size, cfg.img_size) == (192, 12, 3, 768, 16, 224)
    model = vit.ViT(cfg)
    assert 5.6e6 < n_params(model) < 5.8e6  # DeiT-Tiny: 5.7M parameters
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_vit_task_on_digits():
    args = args_for("vit")
    hp = resolve_hparams(args, vit)
    task = vit.Task(args, hp, None, torch.device("cpu"))
    assert task.cfg.img_size == 8 and task.cfg.patch_size == 2 and task.cfg.num_classes == 10
    x, y = task.batch(0, 16, seed=0)
    assert x.shape == (16, 1, 8, 8)
    x0, _ = task.batch(0, 16, seed=0, rank=0, world=2)
    x1, _ = task.batch(0, 16, seed=0, rank=1, world=2)
    assert torch.equal(torch.cat([x0, x1]), x)  # ranks split the global batch
    loss, n = task.loss(task.model, (x, y))
    assert n == 16 and 1.5 < loss.item() < 3.5
    m = task.evaluate(task.model)
    assert set(m) == {"valid_loss", "accuracy"} and 0 <= m["accuracy"] <= 1


def test_resolve_hparams_overrides():
    args = args_for("vit", preset="deit-tiny", set=["depth=2", "heads=4"], dropout=0.2, lr=3e-4)
    hp = resolve_hparams(args, vit)
    assert hp.model_config.depth == 2 and hp.model_config.heads == 4 and hp.model_config.dropout == 0.2
    assert hp.lr == 3e-4 and hp.batch_size == vit.PRESET_TRAINING["deit-tiny"]["batch_size"]  # the preset's
    hp = resolve_hparams(args_for("vit", batch_size=32), vit)
    assert hp.batch_size == 32 and hp.weight_decay == vit.DEFAULTS["weight_decay"]
    with pytest.raises(UserError, match="no field .depht."):
        resolve_hparams(args_for("vit", set=["depht=2"]), vit)
    with pytest.raises(UserError, match="unknown preset"):
        resolve_hparams(args_for("vit", preset="huge"), vit)


# ----------------------------------------------------------------------------- translate


def tiny_translate(vocab=50):
    return translate.Transformer(dataclasses.replace(translate.PRESETS["tiny"], vocab_size=vocab, dropout=0.0)).eval()


def test_translate_iwslt_preset_matches_paper():
    c = translate.PRESETS["iwslt"]
    assert (c.d_model, c.enc_layers, c.dec_layers, c.heads, c.ffn) == (512, 6, 6, 4, 1024)
    model = translate.Transformer(dataclasses.replace(c, vocab_size=1000))
    layer = model.encoder.layers[0]
    assert layer.linear1.out_features == 1024 and layer.activation_relu_or_gelu == 1  # ReLU


def test_translate_tied_and_causal():
    torch.manual_seed(0)
    model = tiny_translate()
    src = torch.randint(4, 50, (2, 7))
    tgt = torch.randint(4, 50, (2, 6))
    logits = model(src, tgt)
    assert logits.shape == (2, 6, 50)
    # output projection = decoder input embedding
    h_grad = torch.autograd.grad(logits.sum(), model.tgt_embed.weight)[0]
    assert h_grad.abs().sum() > 0
    assert not any(isinstance(m, nn.Linear) and m.out_features == 50 for m in model.modules())  # no separate head
    # causal: changing a later target token doesn't change earlier logits
    tgt2 = tgt.clone()
    tgt2[:, 4] = 5
    with torch.no_grad():
        a, b = model(src, tgt), model(src, tgt2)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-5) and not torch.allclose(a[:, 4:], b[:, 4:])
    # padding the source doesn't change the result
    padded = torch.cat([src, torch.zeros(2, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        assert torch.allclose(model(padded, tgt), a, atol=1e-5)


def test_beam_search_beam1_is_greedy():
    torch.manual_seed(0)
    model = tiny_translate()
    src = torch.randint(4, 50, (3, 5))
    out1 = translate.beam_search(model, src, beam=1, max_len=6)
    # greedy by hand
    for b in range(3):
        seq = [translate.BOS]
        for _ in range(6):
            with torch.no_grad():
                nxt = model(src[b:b + 1], torch.tensor([seq]))[0, -1].argmax().item()
            if nxt == translate.EOS:
                break
            seq.append(nxt)
        assert out1[b] == seq[1:]
    out4 = translate.beam_search(model, src, beam=4, max_len=6)
    assert len(out4) == 3 and all(isinstance(h, list) for h in out4)


def test_translate_task_on_toy_data(tmp_path):
    args = args_for("translate", data="toy")
    hp = resolve_hparams(args, translate)
    task = translate.Task(args, hp, tmp_path, torch.device("cpu"))
    assert (tmp_path / "tokenizer.json").is_file()
    src, tgt_in, tgt_out = task.batch(0, 8, seed=0)
    assert src.shape[0] == 8 and torch.equal(tgt_in[:, 1:][tgt_out[:, :-1] != 0], tgt_out[:, :-1][tgt_out[:, :-1] != 0])
    assert (tgt_in[:, 0] == translate.BOS).all()
    loss, n = task.loss(task.model, (src, tgt_in, tgt_out))
    assert torch.isfinite(loss) and n == int((tgt_out != 0).sum())
    task.eval_sentences = 8
    m = task.evaluate(task.model, final=True)
    assert {"valid_loss", "accuracy", "bleu", "test_loss", "test_bleu"} <= set(m)


@pytest.mark.parametrize("smoothing", [None, "torch", "fairseq"])
def test_translate_smoothing_option(tmp_path, smoothing):
    """--smoothing fairseq spreads ε over the V-1 other tokens: the task passes
    F.cross_entropy the torch label smoothing with that loss (ε·V/(V-1)); torch is the default."""
    args = args_for("translate", data="toy", smoothing=smoothing)
    hp = resolve_hparams(args, translate)
    assert hp.smoothing == (smoothing or "torch")
    task = translate.Task(args, hp, tmp_path, torch.device("cpu"))
    V = task.cfg.vocab_size
    want = 0.1 * V / (V - 1) if smoothing == "fairseq" else 0.1
    assert task.label_smoothing == pytest.approx(want, rel=1e-15)


# ----------------------------------------------------------------------------- lm


def test_lm_causal_and_tied():
    torch.manual_seed(0)
    model = lm.GPT(dataclasses.replace(lm.PRESETS["tiny"], vocab_size=30)).eval()
    x = torch.randint(0, 30, (2, 10))
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % 30
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 10, 30)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-5) and not torch.allclose(a[:, 7:], b[:, 7:])
    assert sum(1 for p in model.parameters() if p.shape == (30, 64)) == 1  # one shared table


def test_lm_task_char_and_bpe(tmp_path):
    f = tmp_path / "input.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    for kind in ("char", "bpe"):
        args = args_for("lm", data_dir=str(f), tokenizer=kind, vocab_size=300)
        task = lm.Task(args, resolve_hparams(args, lm), tmp_path, torch.device("cpu"))
        x, y = task.batch(3, 4, seed=0)
        assert x.shape == (4, 64) and torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(task.batch(3, 4, seed=0)[0], x)
        m = task.evaluate(task.model)
        assert m["valid_loss"] > 0 and "perplexity" in m
    assert isinstance(task.sample(task.model, "the", n_tokens=5), str)


# ----------------------------------------------------------------------------- training pieces


def test_count_macs_linear():
    class T:
        def loss(self, model, batch):
            return model(batch).sum(), 1

    model = nn.Sequential(nn.Linear(8, 4))
    x = torch.randn(3, 8, requires_grad=False)
    # forward 3*8*4 MACs, backward: grad wrt weight only (input needs no grad) = another 3*8*4
    assert count_macs(T(), model, x) == 2 * 3 * 8 * 4
    assert model[0].weight.grad is None


def test_energy_estimate():
    assert energy_estimate_mj(10 ** 9, "fp32") == pytest.approx(4.6)
    assert energy_estimate_mj(10 ** 9, "pam-matmul") == pytest.approx(1.0)


def test_lr_schedule():
    lrs = [lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01


def test_pa_divide():
    t = torch.tensor([3.0, -1.5, 0.25])
    assert torch.equal(pa_divide(t.clone(), 2, "fp32"), t / 2)
    assert torch.equal(pa_divide(t.clone(), 2, "pam-matmul"), t / 2)  # exact for powers of two
    assert torch.equal(pa_divide(t.clone(), 1, "pam-matmul"), t)


def test_arith_context():
    with arith_context("fp32")():
        assert not torch.backends.mha.get_fastpath_enabled()
    assert torch.backends.mha.get_fastpath_enabled()
    import pamtorch

    if hasattr(pamtorch, "mode") and hasattr(pamtorch, "Config"):
        with arith_context("pam-matmul")():
            out = nn.Linear(4, 3)(torch.randn(2, 4))
        assert out.shape == (2, 3)
        with pytest.raises(UserError, match="--arith pam-bogus"):
            arith_context("pam-bogus")
    else:  # the PA variants need pamtorch.mode: a clear error until it exists
        with pytest.raises(RuntimeError, match="needs pamtorch.mode"):
            arith_context("pam-matmul")


def _step_vs_full(model, src, tgt):
    memory, src_pad = model.encode(src)
    cache, steps, fulls = None, [], []
    for t in range(1, tgt.size(1) + 1):
        logits, cache = model.decode_step(tgt[:, :t], cache, memory, src_pad)
        steps.append(logits)
        fulls.append(model.decode(tgt[:, :t], memory, src_pad)[:, -1])
    return torch.stack(steps, 1), torch.stack(fulls, 1)


@pytest.mark.parametrize("norm_first", [False, True])
def test_incremental_decoding_equals_the_full_pass(norm_first):
    import dataclasses

    import pamtorch

    torch.manual_seed(1)
    model = tiny_translate()
    if norm_first:
        model = translate.Transformer(dataclasses.replace(model.cfg, norm_first=True))
    model.eval()
    src = torch.randint(4, 50, (3, 7))
    src[0, 5:] = translate.PAD
    tgt = torch.randint(4, 50, (3, 6))
    tgt[:, 0] = translate.BOS
    tgt[1, 3] = translate.PAD  # a dead beam's padding inside a prefix
    with torch.no_grad():
        step, full = _step_vs_full(model, src, tgt)
    assert torch.allclose(step, full, atol=1e-5)
    # under the PA mode every op of a position is the same PA op in both passes: bit for bit
    with torch.no_grad(), pamtorch.mode(pamtorch.Config.full()):
        step, full = _step_vs_full(model, src, tgt)
    assert torch.equal(step, full)


def test_beam_search_incremental_and_per_sentence_limits():
    import pamtorch

    torch.manual_seed(2)
    model = tiny_translate().eval()
    src = torch.randint(4, 50, (4, 9))
    src[1, 2:] = translate.PAD  # a short sentence: its own, shorter length limit
    with pamtorch.mode(pamtorch.Config.full()):
        inc = translate.beam_search(model, src, beam=3)
        full = translate.beam_search(model, src, beam=3, incremental=False)
        alone = translate.beam_search(model, src[1:2, :2], beam=3)
    assert inc == full
    assert alone[0] == inc[1]  # the batch it is decoded in does not matter
    assert len(inc[1]) <= int(2 * 1.5) + 10


# ----------------------------------------------------------------------------- presets carry the paper's setup


def test_iwslt_preset_carries_the_papers_training_setup():
    hp = resolve_hparams(args_for("translate", preset="iwslt"), translate)
    assert (hp.lr, hp.warmup, hp.max_tokens, hp.clip, hp.weight_decay, hp.betas, hp.label_smoothing,
            hp.smoothing) == (5e-4, 4000, 4096, 0.0, 1e-4, (0.9, 0.98), 0.1, "fairseq")
    assert (hp.extra["steps"], hp.extra["max_len_a"], hp.extra["max_len_b"]) == (22021, 1.2, 10)
    c = hp.model_config
    assert (c.dropout, c.attn_dropout, c.act_dropout) == (0.3, 0.0, 0.0)
    model = translate.Transformer(dataclasses.replace(c, vocab_size=100, enc_layers=1, dec_layers=1))
    for layer in list(model.encoder.layers) + list(model.decoder.layers):
        assert layer.self_attn.dropout == 0.0 and layer.dropout.p == 0.0 and layer.dropout1.p == 0.3
    assert model.decoder.layers[0].multihead_attn.dropout == 0.0 and model.drop.p == 0.3
    # the command line wins: --lr, and --batch-size replaces the token batching
    hp = resolve_hparams(args_for("translate", preset="iwslt", lr=1e-3, batch_size=32), translate)
    assert hp.lr == 1e-3 and hp.max_tokens is None and hp.batch_size == 32
    with pytest.raises(UserError, match="--max-tokens 100 --batch-size 32: give one"):
        resolve_hparams(args_for("translate", max_tokens=100, batch_size=32), translate)
    assert resolve_hparams(args_for("translate"), translate).max_tokens is None  # tiny: sentence batches


def test_deit_tiny_preset_carries_the_papers_training_setup():
    hp = resolve_hparams(args_for("vit", preset="deit-tiny"), vit)
    assert (hp.lr, hp.weight_decay, hp.warmup_epochs, hp.min_lr, hp.clip, hp.augment, hp.label_smoothing) == \
        (5e-4, 0.05, 5, 1e-5, 0.0, True, 0.1)
    assert hp.optimizer == "adamw" and hp.extra["epochs"] == 600
    assert (hp.model_config.drop_path, hp.model_config.ln_eps) == (0.1, 1e-6)
    assert resolve_hparams(args_for("vit", preset="deit-tiny", warmup=10), vit).warmup_epochs is None  # steps win
    cfg = dataclasses.replace(hp.model_config, in_chans=3, num_classes=10, depth=5)
    model = vit.ViT(cfg)
    assert [b.drop_path.p for b in model.blocks] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])  # linear in depth
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, nn.LayerNorm))


def test_drop_path_drops_whole_samples_and_scales_the_rest():
    torch.manual_seed(0)
    dp = vit.DropPath(0.25)
    x = torch.randn(4000, 3, 5)
    y = dp(x)
    kept = (y != 0).flatten(1).all(1)
    dropped = (y == 0).flatten(1).all(1)
    assert bool((kept | dropped).all())                       # a sample is kept or dropped whole
    assert 0.22 < dropped.float().mean().item() < 0.28        # with probability p
    assert torch.equal(y[kept], x[kept] * (1 / 0.75))        # the kept ones scaled by 1/(1-p)
    assert torch.equal(dp.eval()(x), x)                       # identity in evaluation
    import pamtorch

    with pamtorch.mode(pamtorch.Config.full()):              # under the mode: x ·̂ (1 ÷̂ (1-p)), no float product
        z = vit.DropPath(0.25)(x)
    k = (z != 0).flatten(1).all(1)
    assert torch.equal(z[k], pamtorch.mul(x[k], pamtorch.div(torch.ones(()), 0.75)))


def _toy_task(tmp_path, **kw):
    args = args_for("translate", data="toy", **kw)
    hp = resolve_hparams(args, translate)
    return translate.Task(args, hp, tmp_path, torch.device("cpu")), hp


def test_token_batches_hold_at_most_max_tokens(tmp_path):
    task, hp = _toy_task(tmp_path, max_tokens=300)
    sizes = [max(len(s), len(t) - 1) for s, t in task.train_pairs]
    batches = task.token_batches
    assert all(len(b) * max(sizes[j] for j in b) <= 300 for b in batches)
    flat = sorted(j for b in batches for j in b)
    assert len(flat) == len(set(flat)) and len(flat) >= len(sizes) - 300 // min(sizes)  # at most a short last one
    assert task.steps_per_epoch(hp.batch_size) == len(batches)
    # a pure function of the step; an epoch visits each batch once, a new epoch in a new order
    n = len(batches)
    seen = [task.batch(i, None, seed=0) for i in range(n + 1)]
    for src, tgt_in, tgt_out in seen:
        assert src.numel() <= 300 and tgt_in.numel() <= 300
    assert all(torch.equal(a, b) for a, b in zip(seen[3], task.batch(3, None, seed=0)))
    first = {tuple(sorted(int(x) for x in s.sum(1))) for s, _, _ in seen[:n]}
    assert len(first) == n
    # two processes split each batch
    a, b = task.batch(5, None, seed=0, rank=0, world=2), task.batch(5, None, seed=0, rank=1, world=2)
    assert len(a[0]) + len(b[0]) == len(seen[5][0])
    with pytest.raises(UserError, match="--max-tokens 8: a batch of the longest training pair"):
        _toy_task(tmp_path, max_tokens=8)


def test_translate_split_trims_each_micro_batch(tmp_path):
    task, hp = _toy_task(tmp_path)
    src, tgt_in, tgt_out = task.batch(0, 16, seed=0)
    parts = task.split((src, tgt_in, tgt_out), 3)
    assert [len(p[0]) for p in parts] == [6, 5, 5]
    for (s, ti, to), s_full, to_full in zip(parts, src.tensor_split(3), tgt_out.tensor_split(3)):
        assert (s[:, -1] != translate.PAD).any() and (to[:, -1] != translate.PAD).any()  # no all-PAD column
        assert torch.equal(s, s_full[:, :s.size(1)]) and (s_full[:, s.size(1):] == translate.PAD).all()
        assert torch.equal(to, to_full[:, :to.size(1)]) and ti.shape == to.shape


def test_beam_search_length_limit_is_max_len_a_times_source_plus_b():
    class NeverEnds(translate.Transformer):
        def decode_step(self, *a):
            logits, cache = super().decode_step(*a)
            logits[:, translate.EOS] = float("-inf")
            return logits, cache

    torch.manual_seed(0)
    model = NeverEnds(dataclasses.replace(translate.PRESETS["tiny"], vocab_size=50, dropout=0.0, max_len=200)).eval()
    src = torch.randint(4, 50, (2, 21))
    src[1, 7:] = translate.PAD
    out = translate.beam_search(model, src, beam=2, max_len_a=1.2, max_len_b=10)
    assert [len(h) for h in out] == [int(21 * 1.2) + 10, int(7 * 1.2) + 10]
    out = translate.beam_search(model, src, beam=2)  # the tiny preset's default: 1.5 x source + 10
    assert [len(h) for h in out] == [int(21 * 1.5) + 10, int(7 * 1.5) + 10]
