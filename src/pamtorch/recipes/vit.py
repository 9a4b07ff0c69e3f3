"""Vision transformer (DeiT-Tiny style) for image classification.

Stock torch.nn modules only (Conv2d patch embedding, LayerNorm, MultiheadAttention, Linear, GELU,
Dropout): pamtorch makes them multiplication-free by its dispatch-level mode, nothing here changes.
Pre-norm blocks, a cls token and learned position embeddings, as in DeiT.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import UserError, at_least


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 0      # 0: take it from the data
    patch_size: int = 0    # 0: img_size // 4 (a 4x4 grid of patches)
    in_chans: int = 0      # 0: from the data
    num_classes: int = 0   # 0: from the data
    dim: int = 192
    depth: int = 12
    heads: int = 3
    mlp_dim: int = 768
    dropout: float = 0.0

    def check(self):
        """Refuse a config no ViT can be built from (a --preset/--set mistake) with one clear line."""
        at_least(self, 0, "img_size", "patch_size", "in_chans", "num_classes")
        at_least(self, 1, "dim", "depth", "heads", "mlp_dim")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--set dropout={self.dropout}: expected 0 <= dropout < 1")
        if self.dim % self.heads:
            raise UserError(f"--set dim={self.dim} heads={self.heads}: dim must be divisible by heads")
        if self.img_size and self.patch_size and self.img_size % self.patch_size:
            raise UserError(f"--set patch_size={self.patch_size}: it must divide img_size={self.img_size}")
        return self


PRESETS = {
    # seconds per epoch on 2 CPU cores on the 8x8 digits
    "tiny": ViTConfig(dim=64, depth=4, heads=4, mlp_dim=128, dropout=0.1),
    # DeiT-Tiny, the paper's size (images are resized to 224x224)
    "deit-tiny": ViTConfig(img_size=224, patch_size=16, dim=192, depth=12, heads=3, mlp_dim=768, dropout=0.0),
}

# training hyperparameters used when the command line does not set them
DEFAULTS = dict(preset="tiny", lr=2e-3, batch_size=64, epochs=15, weight_decay=0.05, warmup=0.05,
                label_smoothing=0.1, clip=1.0, betas=(0.9, 0.999))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = nn.MultiheadAttention(cfg.dim, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.drop = nn.Dropout(cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.mlp_dim), nn.GELU(), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.mlp_dim, cfg.dim), nn.Dropout(cfg.dropout),
        )

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h, h, need_weights=False)[0])
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        assert cfg.img_size % cfg.patch_size == 0, "patch_size must divide img_size"
        self.cfg = cfg
        n_patches = (cfg.img_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.apply(_init)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, images):                                   # (B, C, H, W)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, patches, dim)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))                     # classify from the cls token


def _init(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- training task


class Task:
    """Glue for recipes/train.py: data, batches, loss and evaluation for image classification."""

    metric = "accuracy"
    unit = "img"

    def __init__(self, args, hp, out_dir, device):
        from .data import load_images

        cfg = hp.model_config
        data = load_images(args.data, args.data_dir, cfg.img_size or None)
        c, h, w = data.image_shape
        img = cfg.img_size or h
        cfg = replace(cfg, img_size=img, patch_size=cfg.patch_size or max(1, img // 4),
                      in_chans=cfg.in_chans or c, num_classes=cfg.num_classes or data.num_classes).check()
        if cfg.in_chans != c:
            raise UserError(f"--set in_chans={cfg.in_chans}: the images have {c} channels")
        if cfg.num_classes < data.num_classes:
            raise UserError(f"--set num_classes={cfg.num_classes}: the data has {data.num_classes} classes")
        if (h, w) != (img, img):  # e.g. the deit-tiny preset on small images
            data.train_x = F.interpolate(data.train_x, size=(img, img), mode="bilinear", align_corners=False)
            data.valid_x = F.interpolate(data.valid_x, size=(img, img), mode="bilinear", align_corners=False)
        self.data, self.cfg, self.device = data, cfg, device
        self.label_smoothing = hp.label_smoothing
        self.train_size = len(data.train_y)
        self.model = ViT(cfg)
        self.sampler = None

    def steps_per_epoch(self, batch_size):
        return max(1, self.train_size // batch_size)

    def batch(self, step, batch_size, seed, rank=0, world=1):
        """This rank's share of the global batch of ``step`` (a pure function of the step)."""
        from .data import EpochSampler, rank_slice

        if self.sampler is None:
            self.sampler = EpochSampler(self.train_size, batch_size, seed)
        idx = rank_slice(self.sampler(step), rank, world)
        return self.data.train_x[idx].to(self.device), self.data.train_y[idx].to(self.device)

    def loss(self, model, batch):
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), len(y)

    @torch.no_grad()
    def evaluate(self, model, final=False, batch_size=500):
        model.eval()
        total, correct, n = 0.0, 0, 0
        for i in range(0, len(self.data.valid_y), batch_size):
            x = self.data.valid_x[i:i + batch_size].to(self.device)
            y = self.data.valid_y[i:i + batch_size].to(self.device)
            logits = model(x)
            total += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            n += len(y)
        model.train()
        return {"valid_loss": total / n, "accuracy": correct / n}
