"""Encoder-decoder transformer for translation, like the paper's IWSLT14 DE-EN model
(fairseq ``transformer_iwslt_de_en``: 6+6 layers, d=512, 4 heads, FFN 1024, ReLU, post-norm,
sinusoidal positions, decoder input embedding tied to the output projection).

Stock torch.nn modules only (Embedding, TransformerEncoderLayer, TransformerDecoderLayer). One
joint byte-level BPE vocabulary is trained on the training split of both languages.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import DataError, UserError, at_least

PAD, BOS, EOS = 0, 1, 2  # ids fixed by tokenize.SPECIALS


@dataclass(frozen=True)
class TranslateConfig:
    vocab_size: int = 0   # 0: from the tokenizer
    d_model: int = 512
    enc_layers: int = 6
    dec_layers: int = 6
    heads: int = 4
    ffn: int = 1024
    dropout: float = 0.3
    max_len: int = 256    # longest sentence in tokens (longer training pairs are dropped)
    norm_first: bool = False

    def check(self):
        """Refuse a config no Transformer can be built from (a --preset/--set mistake) with one clear line."""
        at_least(self, 0, "vocab_size")
        at_least(self, 1, "d_model", "enc_layers", "dec_layers", "heads", "ffn")
        at_least(self, 2, "max_len")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--set dropout={self.dropout}: expected 0 <= dropout < 1")
        if self.d_model % self.heads or self.d_model % 2:
            raise UserError(f"--set d_model={self.d_model} heads={self.heads}: d_model must be even (sinusoidal "
                            f"positions) and divisible by heads")
        return self


PRESETS = {
    "tiny": TranslateConfig(d_model=64, enc_layers=2, dec_layers=2, heads=4, ffn=128, dropout=0.1, max_len=64),
    "iwslt": TranslateConfig(),
}

DEFAULTS = dict(preset="tiny", lr=1e-3, batch_size=64, steps=1000, weight_decay=1e-4, warmup=0.05,
                label_smoothing=0.1, clip=1.0, betas=(0.9, 0.98), vocab_size=8000)


def sinusoidal(n, d):
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(n, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe


class Transformer(nn.Module):
    def __init__(self, cfg: TranslateConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.src_embed = nn.Embedding(cfg.vocab_size, d, padding_idx=PAD)
        self.tgt_embed = nn.Embedding(cfg.vocab_size, d, padding_idx=PAD)  # also the output projection
        self.register_buffer("pos", sinusoidal(cfg.max_len + 2, d), persistent=False)
        self.scale = math.sqrt(d)
        self.drop = nn.Dropout(cfg.dropout)
        layer = dict(d_model=d, nhead=cfg.heads, dim_feedforward=cfg.ffn, dropout=cfg.dropout,
                     activation="relu", batch_first=True, norm_first=cfg.norm_first)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer), cfg.enc_layers,
                                             norm=nn.LayerNorm(d) if cfg.norm_first else None,
                                             enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), cfg.dec_layers,
                                             norm=nn.LayerNorm(d) if cfg.norm_first else None)
        for emb in (self.src_embed, self.tgt_embed):
            nn.init.normal_(emb.weight, std=d ** -0.5)
            nn.init.zeros_(emb.weight[PAD])

    def embed(self, table, tokens):
        return self.drop(table(tokens) * self.scale + self.pos[:tokens.size(1)])

    def encode(self, src):                                   # (B, S) -> memory (B, S, d)
        src_pad = src == PAD
        return self.encoder(self.embed(self.src_embed, src), src_key_padding_mask=src_pad), src_pad

    def decode(self, tgt_in, memory, src_pad, last_only=False):  # (B, T) -> logits (B, T, V)
        T = tgt_in.size(1)
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool, device=tgt_in.device), diagonal=1)
        h = self.decoder(self.embed(self.tgt_embed, tgt_in), memory, tgt_mask=causal,
                         tgt_key_padding_mask=tgt_in == PAD, memory_key_padding_mask=src_pad)
        if last_only:                                        # search: only the next token's scores
            h = h[:, -1:]
        return F.linear(h, self.tgt_embed.weight)            # tied output projection

    def forward(self, src, tgt_in):
        memory, src_pad = self.encode(src)
        return self.decode(tgt_in, memory, src_pad)

    def decode_step(self, seqs, cache, memory, src_pad):
        """Next-token logits ``(B, V)`` for the prefixes ``seqs (B, t)``, running the stock decoder
        layers on the last position only.

        ``cache`` holds each layer's inputs at the earlier positions (``None`` at t = 1) and is
        returned extended; the last position's self-attention reads its keys and values from it,
        so a step costs one position instead of t (the caller reorders the cache with the beams).
        Equal to ``decode(seqs, ...)[:, -1]``: every op but self-attention is per position, and
        the causal mask of the full pass hides exactly the positions the cache does not hold.
        """
        t = seqs.size(1)
        x = self.drop(self.tgt_embed(seqs[:, -1:]) * self.scale + self.pos[t - 1:t])
        kpm = seqs == PAD
        new_cache = []
        for i, layer in enumerate(self.decoder.layers):
            xs = x if cache is None else torch.cat([cache[i], x], 1)
            new_cache.append(xs)
            if layer.norm_first:
                kv = layer.norm1(xs)
                x = x + layer.dropout1(layer.self_attn(kv[:, -1:], kv, kv, key_padding_mask=kpm,
                                                       need_weights=False)[0])
                x = x + layer._mha_block(layer.norm2(x), memory, None, src_pad)
                x = x + layer._ff_block(layer.norm3(x))
            else:
                sa = layer.self_attn(x, xs, xs, key_padding_mask=kpm, need_weights=False)[0]
                x = layer.norm1(x + layer.dropout1(sa))
                x = layer.norm2(x + layer._mha_block(x, memory, None, src_pad))
                x = layer.norm3(x + layer._ff_block(x))
        if self.decoder.norm is not None:
            x = self.decoder.norm(x)
        return F.linear(x[:, 0], self.tgt_embed.weight), new_cache


@torch.no_grad()
def beam_search(model, src, beam=5, max_len=None, len_penalty=1.0, incremental=True):
    """Batched beam search; returns the best token list (without BOS/EOS) per source sentence.

    Each sentence gets its own length limit, ``min(max_len, 1.5 * its source length + 10)``
    tokens (``max_len`` defaults to the model's), so a sentence's result does not depend on
    the batch it is decoded in. ``incremental`` decodes one position per step with a cache of
    the decoder's layer inputs (``Transformer.decode_step``); ``False`` recomputes the prefix.
    """
    B = src.size(0)
    cap = max_len or model.cfg.max_len
    src_len = (src != PAD).sum(1).tolist()
    limit = [min(cap, int(n * 1.5) + 10) for n in src_len]
    max_len = max(limit)
    memory, src_pad = model.encode(src)
    memory, src_pad = memory.repeat_interleave(beam, 0), src_pad.repeat_interleave(beam, 0)
    seqs = torch.full((B * beam, 1), BOS, dtype=torch.long, device=src.device)
    scores = torch.full((B, beam), float("-inf"), device=src.device)
    scores[:, 0] = 0.0
    finished = [[] for _ in range(B)]
    done = [False] * B
    cache = None
    for t in range(max_len):
        if incremental:
            logits, cache = model.decode_step(seqs, cache, memory, src_pad)
        else:
            logits = model.decode(seqs, memory, src_pad, last_only=True)[:, -1]
        logp = logits.float().log_softmax(-1)
        V = logp.size(-1)
        cand = (scores.unsqueeze(-1) + logp.view(B, beam, V)).view(B, -1)
        top, idx = cand.topk(2 * beam, dim=-1)
        top, idx = top.tolist(), idx.tolist()
        rows, toks, new_scores = [], [], []
        for b in range(B):
            keep = []
            for s, i in zip(top[b], idx[b]):
                k, tok = divmod(i, V)
                if done[b] or s == float("-inf"):
                    break
                if tok == EOS or t >= limit[b] - 1:
                    hyp = seqs[b * beam + k, 1:].tolist() + ([] if tok == EOS else [tok])
                    finished[b].append((s / max(1, len(hyp) + 1) ** len_penalty, hyp))
                    if len(finished[b]) >= beam:
                        done[b] = True
                        break
                else:
                    keep.append((s, b * beam + k, tok))
                if len(keep) == beam:
                    break
            if t >= limit[b] - 1:  # this sentence's length limit: what finished is all it gets
                done[b] = True
            keep += [(float("-inf"), b * beam, PAD)] * (beam - len(keep))
            for s, r, tok in keep:
                rows.append(r)
                toks.append(tok)
                new_scores.append(s)
        if all(done):
            break
        seqs = torch.cat([seqs[rows], torch.tensor(toks, device=src.device)[:, None]], 1)
        if cache is not None:
            cache = [c[rows] for c in cache]
        scores = torch.tensor(new_scores, device=src.device).view(B, beam)
    return [max(f)[1] if f else [] for f in finished]


# ----------------------------------------------------------------------------- training task


def _pad(seqs, device):
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device)


class Task:
    """Sentence pairs batched by similar length; metrics: valid loss, token accuracy and BLEU."""

    metric = "bleu"
    unit = "tok"

    def __init__(self, args, hp, out_dir, device):
        from pathlib import Path

        from .data import load_parallel, toy_parallel
        from .tokenize import BPETokenizer, encode_all, load_tokenizer

        src, tgt = getattr(args, "src", None) or "de", getattr(args, "tgt", None) or "en"
        if src == tgt:
            raise DataError(f"--src {src} --tgt {tgt}: the source and target languages must differ")
        if args.data_dir is None:
            if args.data not in (None, "toy"):
                raise DataError(f"--data {args.data} needs --data-dir (a folder with train.{src}, train.{tgt}, ...)")
            splits = toy_parallel(seed=0, src=src, tgt=tgt)
        elif args.data not in (None, "parallel"):
            raise DataError(f"--data {args.data} with --data-dir: expected --data parallel (or no --data); "
                            f"the built-in toy task takes no --data-dir")
        else:
            splits = load_parallel(args.data_dir, src, tgt)
        tok_path = Path(out_dir) / "tokenizer.json" if out_dir is not None else None
        if tok_path is not None and tok_path.is_file() and getattr(args, "resume", False):
            tok = load_tokenizer(tok_path)
        else:
            vocab = getattr(args, "vocab_size", None) or hp.extra.get("vocab_size", 8000)
            tok = BPETokenizer.train(splits["train"][0] + splits["train"][1], vocab_size=vocab)
        if tok_path is not None:
            tok.save(tok_path)
        cfg = replace(hp.model_config, vocab_size=hp.model_config.vocab_size or tok.vocab_size).check()
        if cfg.vocab_size < tok.vocab_size:
            raise UserError(f"--set vocab_size={cfg.vocab_size}: the tokenizer has {tok.vocab_size} tokens")
        L = cfg.max_len
        self.tok, self.cfg, self.device, self.splits = tok, cfg, device, splits
        self.label_smoothing = hp.label_smoothing
        self.beam = getattr(args, "beam", None) or 5
        self.eval_sentences = getattr(args, "eval_sentences", None) or 500
        enc = {k: (encode_all(tok, s), encode_all(tok, t)) for k, (s, t) in splits.items()}
        # training pairs longer than max_len are dropped (as fairseq does); eval pairs are truncated
        self.train_pairs = [(s + [EOS], [BOS] + t + [EOS]) for s, t in zip(*enc["train"])
                            if 0 < len(s) < L and 0 < len(t) < L]
        if not self.train_pairs:
            raise DataError(f"{args.data_dir or 'toy data'}: no training pair of non-empty sentences is shorter "
                            f"than --set max_len={L} tokens")
        self.eval_pairs = {k: [(s[:L - 1] + [EOS], [BOS] + t[:L - 1] + [EOS]) for s, t in zip(*enc[k])]
                           for k in enc if k != "train"}
        self.train_size = len(self.train_pairs)
        self.model = Transformer(cfg)
        self._epoch, self._batches = None, None

    def steps_per_epoch(self, batch_size):
        return max(1, self.train_size // batch_size)

    def _epoch_batches(self, epoch, batch_size, seed):
        """Shuffle, then sort chunks of 50 batches by length (less padding), then shuffle the batches."""
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perm = torch.randperm(self.train_size, generator=g).tolist()
            n = self.steps_per_epoch(batch_size) * batch_size
            perm, batches, chunk = perm[:n], [], 50 * batch_size
            for i in range(0, n, chunk):
                part = sorted(perm[i:i + chunk], key=lambda j: len(self.train_pairs[j][1]))
                batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
            order = torch.randperm(len(batches), generator=g).tolist()
            self._epoch, self._batches = epoch, [batches[i] for i in order]
        return self._batches

    def batch(self, step, batch_size, seed, rank=0, world=1):
        from .data import rank_slice

        epoch, i = divmod(step, self.steps_per_epoch(batch_size))
        idx = rank_slice(self._epoch_batches(epoch, batch_size, seed)[i], rank, world)
        pairs = [self.train_pairs[j] for j in idx]
        src = _pad([s for s, _ in pairs], self.device)
        tgt = _pad([t for _, t in pairs], self.device)
        return src, tgt[:, :-1], tgt[:, 1:]

    def loss(self, model, batch):
        src, tgt_in, tgt_out = batch
        logits = model(src, tgt_in)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD,
                               label_smoothing=self.label_smoothing)
        return loss, int((tgt_out != PAD).sum())

    @torch.no_grad()
    def evaluate(self, model, final=False, batch_size=64):
        import sacrebleu

        model.eval()
        net = getattr(model, "module", model)
        out = {}
        for split in ("valid", "test") if final else ("valid",):
            if split not in self.eval_pairs:
                continue
            pairs = self.eval_pairs[split]
            total, correct, n = 0.0, 0, 0
            for i in range(0, len(pairs), batch_size):
                chunk = pairs[i:i + batch_size]
                src = _pad([s for s, _ in chunk], self.device)
                tgt = _pad([t for _, t in chunk], self.device)
                logits = net(src, tgt[:, :-1])
                y = tgt[:, 1:]
                total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=PAD, reduction="sum").item()
                correct += ((logits.argmax(-1) == y) & (y != PAD)).sum().item()
                n += (y != PAD).sum().item()
            # during training: greedy on at most 100 sentences (cheap); at the end: --beam on --eval-sentences
            k = min(len(pairs), self.eval_sentences if final else min(100, self.eval_sentences))
            beam = self.beam if final else 1
            hyps = [""] * k
            order = sorted(range(k), key=lambda j: len(pairs[j][0]))  # batches of similar length
            for i in range(0, k, batch_size):
                idx = order[i:i + batch_size]
                src = _pad([pairs[j][0] for j in idx], self.device)
                for j, h in zip(idx, beam_search(net, src, beam=beam)):
                    hyps[j] = self.tok.decode(h)
            refs = self.splits[split][1][:k]
            bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
            prefix = "" if split == "valid" else "test_"
            out.update({f"{prefix}valid_loss" if prefix else "valid_loss": total / n,
                        f"{prefix}accuracy": correct / n, f"{prefix}bleu": bleu})
            if final and split == "valid":
                out["examples"] = [{"src": self.splits[split][0][j], "ref": refs[j], "hyp": hyps[j]}
                                   for j in range(min(3, k))]
        model.train()
        if "test_valid_loss" in out:
            out["test_loss"] = out.pop("test_valid_loss")
        return out
