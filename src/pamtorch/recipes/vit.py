"""Vision transformer (DeiT-Tiny style) for image classification.

Stock torch.nn modules only (Conv2d patch embedding, LayerNorm, MultiheadAttention, Linear, GELU,
Dropout) plus stochastic depth: pamtorch makes them multiplication-free by its dispatch-level mode,
nothing here changes. Pre-norm blocks, a cls token and learned position embeddings, as in DeiT.

Presets: ``tiny`` (default) is a small ViT for the 8x8 digits on a CPU. ``deit-tiny`` is the
paper's model and training setup, from the released DeiT command (epfml/pam README, "TIMM DeiT
CIFAR10 & i1k": ``--model deit_tiny_patch16_224 --drop-path 0.1 -b 64 --opt adamw --lr 5e-4
--weight-decay 0.05 --sched cosine --min-lr 1e-5 --warmup-epochs 5 --smoothing 0.1 --epochs 600``, timm's
DeiT LayerNorm eps 1e-6, no gradient clipping as timm's default). Its augmentation is the light
one (random crop, flip); the released command's RandAugment, mixup, cutmix, random erasing and
colour jitter are not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ImageTask, UserError, at_least, load_images


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
    drop_path: float = 0.0  # stochastic depth of the last block; block i gets drop_path * i / (depth - 1)
    ln_eps: float = 1e-5    # LayerNorm epsilon (torch's default; DeiT's is 1e-6)

    def check(self):
        """Refuse a config no ViT can be built from (a --preset/--set mistake) with one clear line."""
        at_least(self, 0, "img_size", "patch_size", "in_chans", "num_classes")
        at_least(self, 1, "dim", "depth", "heads", "mlp_dim")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--set dropout={self.dropout}: expected 0 <= dropout < 1")
        if not 0 <= self.drop_path < 1:
            raise UserError(f"--set drop_path={self.drop_path}: expected 0 <= drop_path < 1")
        if not self.ln_eps > 0:
            raise UserError(f"--set ln_eps={self.ln_eps}: expected a number > 0")
        if self.dim % self.heads:
            raise UserError(f"--set dim={self.dim} heads={self.heads}: dim must be divisible by heads")
        if self.img_size and self.patch_size and self.img_size % self.patch_size:
            raise UserError(f"--set patch_size={self.patch_size}: it must divide img_size={self.img_size}")
        return self


PRESETS = {
    # seconds per epoch on 2 CPU cores on the 8x8 digits
    "tiny": ViTConfig(dim=64, depth=4, heads=4, mlp_dim=128, dropout=0.1),
    # DeiT-Tiny, the paper's size (images are resized to 224x224); drop path 0.1 (--drop-path 0.1 of
    # the released command) and LayerNorm eps 1e-6 (timm's DeiT)
    "deit-tiny": ViTConfig(img_size=224, patch_size=16, dim=192, depth=12, heads=3, mlp_dim=768, dropout=0.0,
                           drop_path=0.1, ln_eps=1e-6),
}

# the training settings a preset brings (the command line overrides them); sources in the docstring
PRESET_TRAINING = {
    "deit-tiny": dict(
        lr=5e-4,             # --lr 5e-4
        weight_decay=0.05,   # --weight-decay 0.05
        betas=(0.9, 0.999),  # --opt adamw (timm's default betas), --opt-eps 1e-8 (torch's default)
        label_smoothing=0.1,  # timm's --smoothing 0.1 (spread as torch does)
        warmup_epochs=5,     # --warmup-epochs 5 (counted in steps: 5 x steps per epoch)
        min_lr=1e-5,         # --min-lr 1e-5 (cosine schedule, --sched cosine)
        clip=0.0,            # timm's train.py clips only with --clip-grad, which the command does not pass
        batch_size=256,      # -b 64 on --nproc_per_node 4: a global batch of 256
        augment=True,        # light augmentation (random crop with padding, horizontal flip)
        epochs=600,          # --epochs 600 (the CIFAR-10 command; ImageNet: 300)
    ),
}

# training hyperparameters used when the command line does not set them
DEFAULTS = dict(preset="tiny", lr=2e-3, batch_size=64, epochs=15, weight_decay=0.05, warmup=0.05,
                label_smoothing=0.1, clip=1.0, betas=(0.9, 0.999))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016, as timm's DropPath): in training each sample's residual
    branch is dropped with probability p, the kept ones are scaled by 1/(1-p): x·m/(1-p), m ~ Bernoulli(1-p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self):
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block: x + drop_path(attn(ln(x))), then x + drop_path(mlp(ln(x)))."""

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.attn = nn.MultiheadAttention(cfg.dim, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.drop = nn.Dropout(cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.mlp_dim), nn.GELU(), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.mlp_dim, cfg.dim), nn.Dropout(cfg.dropout),
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.drop_path(self.drop(self.attn(h, h, h, need_weights=False)[0]))
        return x + self.drop_path(self.mlp(self.ln2(x)))


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
        # stochastic depth grows linearly with depth, as in DeiT/timm
        self.blocks = nn.ModuleList(Block(cfg, cfg.drop_path * i / max(1, cfg.depth - 1)) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
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


class Task(ImageTask):
    """Glue for recipes/train.py: the images (resized to the config's img_size if it is set) and the ViT."""

    def __init__(self, args, hp, out_dir, device):
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
        super().__init__(data, hp, device)
        self.cfg = cfg
        self.model = ViT(cfg)
