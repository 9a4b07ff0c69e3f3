"""Decoder-only language model (GPT style) on characters or BPE tokens.

Stock torch.nn modules only (Embedding, LayerNorm, MultiheadAttention with a causal mask, Linear,
GELU, Dropout); the output projection is tied to the token embedding.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import functional as PF
from .data import DataError, UserError, at_least


@dataclass(frozen=True)
class LMConfig:
    vocab_size: int = 0   # 0: from the tokenizer
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2

    def check(self):
        """Refuse a config no GPT can be built from (a --preset/--set mistake) with one clear line."""
        at_least(self, 0, "vocab_size")
        at_least(self, 1, "block_size", "n_layer", "n_head", "n_embd")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--set dropout={self.dropout}: expected 0 <= dropout < 1")
        if self.n_embd % self.n_head:
            raise UserError(f"--set n_embd={self.n_embd} n_head={self.n_head}: n_embd must be divisible by n_head")
        return self


PRESETS = {
    "tiny": LMConfig(block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0),
    "small": LMConfig(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),  # nanoGPT shakespeare-char
}

DEFAULTS = dict(preset="tiny", lr=1e-3, batch_size=32, steps=500, weight_decay=0.1, warmup=0.05,
                label_smoothing=0.0, clip=1.0, betas=(0.9, 0.99))


class Block(nn.Module):
    """Pre-norm causal self-attention block."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = nn.MultiheadAttention(cfg.n_embd, cfg.n_head, dropout=cfg.dropout, batch_first=True)
        self.drop = nn.Dropout(cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout),
        )

    def forward(self, x, causal_mask):
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h, h, attn_mask=causal_mask, need_weights=False)[0])
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        mask = torch.triu(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)  # True = may not attend

    def forward(self, idx):                                   # (B, T) token ids
        T = idx.size(1)
        x = self.drop(self.tok_emb(idx) + self.pos_emb.weight[:T])
        for block in self.blocks:
            x = block(x, self.causal_mask[:T, :T])
        return F.linear(self.ln_f(x), self.tok_emb.weight)    # tied output projection


# ----------------------------------------------------------------------------- training task


class Task:
    """Random windows of a token stream; metrics are next-token loss and accuracy on the valid text."""

    metric = "accuracy"
    unit = "tok"

    def __init__(self, args, hp, out_dir, device):
        from pathlib import Path

        from .data import load_text
        from .tokenize import BPETokenizer, CharTokenizer, load_tokenizer

        train_text, valid_text = load_text(args.data, args.data_dir)
        tok_path = Path(out_dir) / "tokenizer.json"
        if tok_path.is_file() and getattr(args, "resume", False):
            tok = load_tokenizer(tok_path)
        elif (getattr(args, "tokenizer", None) or "char") == "bpe":
            tok = BPETokenizer.train(train_text.split("\n"), vocab_size=getattr(args, "vocab_size", None) or 2000)
        else:
            tok = CharTokenizer.train(train_text)
        if out_dir is not None:
            tok.save(tok_path)
        self.tok = tok
        self.train_ids = torch.tensor(_encode(tok, train_text), dtype=torch.long)
        self.valid_ids = torch.tensor(_encode(tok, valid_text), dtype=torch.long)
        cfg = replace(hp.model_config, vocab_size=hp.model_config.vocab_size or tok.vocab_size).check()
        if cfg.vocab_size < tok.vocab_size:
            raise UserError(f"--set vocab_size={cfg.vocab_size}: the tokenizer has {tok.vocab_size} tokens")
        if len(self.valid_ids) <= cfg.block_size + 1 or len(self.train_ids) <= cfg.block_size + 1:
            raise DataError(f"{args.data_dir or 'built-in text'}: {len(self.train_ids)} training and "
                            f"{len(self.valid_ids)} validation tokens, too few for --set block_size={cfg.block_size} "
                            f"(expected more than block_size + 1 of each)")
        self.cfg, self.device = cfg, device
        self.label_smoothing = PF.torch_label_smoothing(hp.label_smoothing, cfg.vocab_size, hp.smoothing)
        self.train_size = len(self.train_ids) // cfg.block_size  # windows per "epoch"
        self.model = GPT(cfg)

    def steps_per_epoch(self, batch_size):
        return max(1, self.train_size // batch_size)

    def batch(self, step, batch_size, seed, rank=0, world=1):
        from .data import rank_slice

        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(len(self.train_ids) - self.cfg.block_size - 1, (batch_size,), generator=g)
        starts = rank_slice(starts, rank, world)
        offs = torch.arange(self.cfg.block_size + 1)
        chunk = self.train_ids[starts[:, None] + offs]
        return chunk[:, :-1].to(self.device), chunk[:, 1:].to(self.device)

    def loss(self, model, batch):
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), label_smoothing=self.label_smoothing), y.numel()

    @torch.no_grad()
    def evaluate(self, model, final=False, max_windows=256, batch_size=32):
        model.eval()
        T = self.cfg.block_size
        n_win = min(max_windows, (len(self.valid_ids) - 1) // T)
        total, correct, n = 0.0, 0, 0
        for i in range(0, n_win, batch_size):
            starts = torch.arange(i, min(i + batch_size, n_win)) * T
            chunk = self.valid_ids[starts[:, None] + torch.arange(T + 1)].to(self.device)
            logits = model(chunk[:, :-1])
            y = chunk[:, 1:]
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            n += y.numel()
        model.train()
        import math

        loss = total / n
        return {"valid_loss": loss, "accuracy": correct / n, "perplexity": math.exp(min(loss, 50.0))}

    @torch.no_grad()
    def sample(self, model, prompt="\n", n_tokens=200, temperature=1.0, seed=0):
        """Sample text (for a quick look; not used in training)."""
        model.eval()
        g = torch.Generator().manual_seed(seed)
        idx = torch.tensor([_encode(self.tok, prompt) or [0]], dtype=torch.long)
        for _ in range(n_tokens):
            logits = model(idx[:, -self.cfg.block_size:].to(self.device))[0, -1].float().cpu()
            probs = torch.softmax(logits / temperature, -1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=g)[None]], 1)
        return self.tok.decode(idx[0].tolist())


def _encode(tok, text):
    return tok.encode(text)
