"""Encoder-decoder transformer for translation, like the paper's IWSLT14 DE-EN model
(fairseq ``transformer_iwslt_de_en``: 6+6 layers, d=512, 4 heads, FFN 1024, ReLU, post-norm,
sinusoidal positions, decoder input embedding tied to the output projection).

Stock torch.nn modules only (Embedding, TransformerEncoderLayer, TransformerDecoderLayer). One
joint byte-level BPE vocabulary is trained on the training split of both languages.

Dropout as in fairseq: ``dropout`` on the embeddings and the residual branches, ``attn_dropout`` on
the attention weights and ``act_dropout`` after the FFN's ReLU (fairseq's ``--attention-dropout``
and ``--activation-dropout``, both 0 in ``transformer_iwslt_de_en``).

Presets: ``tiny`` (default) and ``small`` are small models for a CPU. ``iwslt`` is the paper's model and training
setup, from the released command (epfml/pam README, "FAIRSEQ IWSLT2014-De-En": ``--arch
transformer_iwslt_de_en --share-decoder-input-output-embed --optimizer adam --adam-betas
'(0.9, 0.98)' --clip-norm 0.0 --lr 5e-4 --lr-scheduler cosine --warmup-updates 4000 --dropout 0.3
--weight-decay 0.0001 --label-smoothing 0.1 --max-tokens 4096 --eval-bleu-args '{"beam": 5,
"max_len_a": 1.2, "max_len_b": 10}' --max-update 22021``), with fairseq's
``label_smoothed_cross_entropy`` (ε/(V-1) to each other token; ``--smoothing fairseq``). Not reproduced: fairseq's Adam applies
the weight decay as L2 in the gradient (AdamW decouples it here), its warmup starts at lr 0 and its
BLEU is on Moses-detokenized text after removing its own BPE.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import functional as PF
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
    dropout: float = 0.3       # embeddings and residual branches
    attn_dropout: float = 0.0  # attention weights
    act_dropout: float = 0.0   # after the FFN's ReLU
    max_len: int = 256    # longest sentence in tokens (longer training pairs are dropped)
    norm_first: bool = False

    def check(self):
        """Refuse a config no Transformer can be built from (a --preset/--set mistake) with one clear line."""
        at_least(self, 0, "vocab_size")
        at_least(self, 1, "d_model", "enc_layers", "dec_layers", "heads", "ffn")
        at_least(self, 2, "max_len")
        for name in ("dropout", "attn_dropout", "act_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"--set {name}={getattr(self, name)}: expected 0 <= {name} < 1")
        if self.d_model % self.heads or self.d_model % 2:
            raise UserError(f"--set d_model={self.d_model} heads={self.heads}: d_model must be even (sinusoidal "
                            f"positions) and divisible by heads")
        return self


PRESETS = {
    "tiny": TranslateConfig(d_model=64, enc_layers=2, dec_layers=2, heads=4, ffn=128, dropout=0.1, max_len=64),
    # the size RESULTS.md's translation seed table uses: fp32 passes 15 BLEU on ../shared/data/de-en
    # within 2000 steps (batch 64) on a CPU
    "small": TranslateConfig(d_model=128, enc_layers=3, dec_layers=3, heads=4, ffn=512, dropout=0.1, max_len=64),
    "iwslt": TranslateConfig(),
}

# training hyperparameters used when the command line does not set them; decoding: beam search
# up to max_len_a * source length + max_len_b tokens
DEFAULTS = dict(preset="tiny", lr=1e-3, batch_size=64, steps=1000, weight_decay=1e-4, warmup=0.05,
                label_smoothing=0.1, clip=1.0, betas=(0.9, 0.98), vocab_size=8000, max_len_a=1.5, max_len_b=10)

# the training settings a preset brings (the command line overrides them); sources in the docstring
PRESET_TRAINING = {
    "iwslt": dict(
        lr=5e-4,              # --lr 5e-4
        warmup=4000,          # --warmup-updates 4000 (steps)
        steps=22021,          # --max-update 22021 (cosine schedule over the run)
        max_tokens=4096,      # --max-tokens 4096 (batches by token count; --batch-size replaces it)
        clip=0.0,             # --clip-norm 0.0
        weight_decay=1e-4,    # --weight-decay 0.0001
        betas=(0.9, 0.98),    # --adam-betas '(0.9, 0.98)'
        label_smoothing=0.1,  # --label-smoothing 0.1
        smoothing="fairseq",  # --criterion label_smoothed_cross_entropy: ε/(V-1) to each other token
        max_len_a=1.2,        # --eval-bleu-args max_len_a 1.2, max_len_b 10 (beam 5 is --beam's default)
        max_len_b=10,
    ),
}


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
        self.encoder = nn.TransformerEncoder(_fairseq_dropout(nn.TransformerEncoderLayer(**layer), cfg),
                                             cfg.enc_layers, norm=nn.LayerNorm(d) if cfg.norm_first else None,
                                             enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(_fairseq_dropout(nn.TransformerDecoderLayer(**layer), cfg),
                                             cfg.dec_layers, norm=nn.LayerNorm(d) if cfg.norm_first else None)
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
        # tgt_is_causal: the mask is causal by construction; left to torch, the decoder checks it
        # against a generated mask (a data-dependent branch: a graph break under torch.compile).
        # With the padding mask given, attention still applies the merged mask (same numerics).
        h = self.decoder(self.embed(self.tgt_embed, tgt_in), memory, tgt_mask=causal,
                         tgt_key_padding_mask=tgt_in == PAD, memory_key_padding_mask=src_pad,
                         tgt_is_causal=True)
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


def _fairseq_dropout(layer, cfg):
    """A stock encoder/decoder layer (built with ``dropout=cfg.dropout`` everywhere) with fairseq's
    split: ``attn_dropout`` on the attention weights, ``act_dropout`` after the ReLU; the residual
    dropouts (dropout1..3) keep ``cfg.dropout``. The TransformerEncoder/Decoder copy it per layer."""
    for attn in (layer.self_attn, getattr(layer, "multihead_attn", None)):
        if attn is not None:
            attn.dropout = cfg.attn_dropout
    layer.dropout = nn.Dropout(cfg.act_dropout)
    return layer


@torch.no_grad()
def beam_search(model, src, beam=5, max_len=None, len_penalty=1.0, incremental=True, max_len_a=1.5, max_len_b=10):
    """Batched beam search; returns the best token list (without BOS/EOS) per source sentence.

    Each sentence gets its own length limit, ``min(max_len, max_len_a * its source length +
    max_len_b)`` tokens (fairseq's ``max_len_a``/``max_len_b``; ``max_len`` defaults to the
    model's), so a sentence's result does not depend on the batch it is decoded in. ``incremental`` decodes one position per step with a cache of
    the decoder's layer inputs (``Transformer.decode_step``); ``False`` recomputes the prefix.
    """
    B = src.size(0)
    cap = max_len or model.cfg.max_len
    src_len = (src != PAD).sum(1).tolist()
    limit = [min(cap, int(n * max_len_a) + max_len_b) for n in src_len]
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
    """Sentence pairs batched by similar length, ``--batch-size`` sentences or ``--max-tokens``
    tokens per batch; metrics: valid loss, token accuracy and BLEU."""

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
        # torch's label_smoothing for the asked spread (fairseq's: ε·V/(V-1), the same loss)
        self.label_smoothing = PF.torch_label_smoothing(hp.label_smoothing, cfg.vocab_size, hp.smoothing)
        self.beam = getattr(args, "beam", None) or 5
        self.max_len_a, self.max_len_b = hp.extra.get("max_len_a", 1.5), hp.extra.get("max_len_b", 10)
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
        self.token_batches = None
        max_tokens = getattr(hp, "max_tokens", None)
        if max_tokens:  # a step takes --accum batches of max_tokens, split over the processes
            import torch.distributed as dist

            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            accum = getattr(hp, "accum", 1)
            self.token_batches = self._token_batches(max_tokens * accum, accum * world, getattr(args, "seed", 0),
                                                     f"--max-tokens {max_tokens}")

    def _token_batches(self, budget, parts, seed, what):
        """The training pairs in batches of at most ``budget`` padded tokens, ``n · max(size) <=
        budget`` with a pair's size max(source, target input) length, as fairseq's --max-tokens:
        the pairs sorted by size (ties in a seed-fixed random order) and filled greedily. Each
        batch holds at least ``parts`` pairs (processes x micro-batches); a shorter last batch is
        dropped."""
        sizes = [max(len(s), len(t) - 1) for s, t in self.train_pairs]
        if budget < parts * max(sizes):
            raise UserError(f"{what}: a batch of the longest training pair ({max(sizes)} tokens) split into {parts} "
                            f"parts (processes x --accum) needs at least {parts * max(sizes)} tokens")
        tie = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(seed)).tolist()
        batches, cur, longest = [], [], 0
        for j in sorted(range(len(sizes)), key=lambda j: (sizes[j], tie[j])):
            if cur and (len(cur) + 1) * max(longest, sizes[j]) > budget:
                batches.append(cur)
                cur, longest = [], 0
            cur.append(j)
            longest = max(longest, sizes[j])
        if len(cur) >= parts:
            batches.append(cur)
        return batches

    def steps_per_epoch(self, batch_size):
        if self.token_batches is not None:
            return len(self.token_batches)
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
        """This rank's share of the batch of ``step``: ``batch_size`` sentences, or with
        --max-tokens one token batch (the same batches every epoch, in a new order)."""
        from .data import rank_slice

        epoch, i = divmod(step, self.steps_per_epoch(batch_size))
        if self.token_batches is not None:
            order = torch.randperm(len(self.token_batches),
                                   generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            batch = self.token_batches[int(order[i])]
        else:
            batch = self._epoch_batches(epoch, batch_size, seed)[i]
        pairs = [self.train_pairs[j] for j in rank_slice(batch, rank, world)]
        src = _pad([s for s, _ in pairs], self.device)
        tgt = _pad([t for _, t in pairs], self.device)
        return src, tgt[:, :-1], tgt[:, 1:]

    def split(self, batch, n):
        """``n`` micro-batches of consecutive sentences (``--accum``), each cut to its longest
        source and target: no more padding than a batch of its own would have."""
        out = []
        for src, tgt_in, tgt_out in zip(*(t.tensor_split(n) for t in batch)):
            s, t = int((src != PAD).sum(1).max()), int((tgt_out != PAD).sum(1).max())
            out.append((src[:, :s], tgt_in[:, :t], tgt_out[:, :t]))
        return out

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
                for j, h in zip(idx, beam_search(net, src, beam=beam, max_len_a=self.max_len_a,
                                                 max_len_b=self.max_len_b)):
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
