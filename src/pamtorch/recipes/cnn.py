"""Convolutional nets for image classification: the paper's CNN experiments on CIFAR-10.

Two models from stock torch.nn modules (Conv2d, BatchNorm2d, ReLU, MaxPool2d, Linear), after the
released code (epfml/pam, ``submodules/timm/timm/models/cifar_resnet.py`` and ``vgg.py``):

* ``resnet``: pre-activation ResNet, CIFAR layout. A 3x3 stem convolution, then 3 stages of
  ``blocks`` basic blocks, ``x + conv(relu(bn(conv(relu(bn(x))))))``, with 16, 32, 64 channels and
  stride 2 at the start of stages 2 and 3 (a BatchNorm and 1x1 convolution on the shortcut where
  the shape changes), a final BatchNorm-ReLU, global average pooling and a linear classifier.
  Depth 6·blocks + 2: ResNet-20 has 3 blocks per stage, ResNet-110 18.
* ``vgg``: stages of ``blocks`` 3x3 convolutions (each followed by BatchNorm if ``batchnorm``,
  then ReLU) and a 2x2 max pool after each stage, global average pooling, an optional two-layer
  ReLU MLP of width ``mlp_dim`` (VGG13's ``num_features=512`` pre-logits) and a linear classifier.

The first stage has no stride and the max pools round up (``ceil_mode``), so the nets take any
image of at least 1x1 pixels with any number of channels: the 8x8 digits, 28x28 Fashion-MNIST and
32x32 CIFAR-10 alike.

Arithmetic: the paper's CNN variant makes only the convolutions and linear layers piecewise affine
(PA), BatchNorm stays exact: ``--arith pam-conv``. ``--arith pam-full`` makes BatchNorm (and the
loss, the optimizer and everything else) PA as well.

Presets (model and training; the command line overrides each value), from the released commands
(epfml/pam README, "TIMM CIFAR10 CNNs"):

* ``resnet20`` (default) and ``resnet110``: "Pre-residual RN20" / "RN110": ``-b 256 --opt sgd --lr
  0.2 --momentum 0.9 --weight-decay 2e-4 --sched cosine --warmup-epochs 5 --min-lr 1e-5
  --smoothing 0.0 --random-crop-pad 4`` (timm's ``sgd`` is SGD with Nesterov momentum; timm
  applies no weight decay to biases and BatchNorm, and clips no gradients unless asked).
* ``vgg13``: "VGG13 without BN, num_features=512": the same with ``-b 128 --lr 0.05
  --weight-decay 5e-4``.
* ``vgg``: a small VGG with BatchNorm (3 stages of 2 convolutions, 32/64/128 channels), vgg13's
  training settings.

The paper trains 200 epochs (``--epochs 200``); the default here, 30, finishes on a CPU. The
augmentation (random crop with padding 4, horizontal flip) is on by default for cifar10 only
(``--augment`` / ``--no-augment``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch.nn as nn

from .data import ImageTask, UserError, at_least, load_images


@dataclass(frozen=True)
class CNNConfig:
    model: str = "resnet"      # resnet (pre-activation) or vgg
    blocks: int = 3            # resnet: basic blocks per stage (depth 6*blocks + 2); vgg: convolutions per stage
    widths: str = "16,32,64"   # channels of each stage, comma-separated
    batchnorm: bool = True     # vgg: BatchNorm after each convolution (a resnet always has it)
    mlp_dim: int = 0           # vgg: width of a two-layer ReLU MLP before the classifier (0: none)
    dropout: float = 0.0       # before the classifier
    in_chans: int = 0          # 0: from the data
    num_classes: int = 0       # 0: from the data

    @property
    def stage_widths(self):
        return [int(w) for w in self.widths.split(",")]

    def check(self):
        """Refuse a config no net can be built from (a --preset/--set mistake) with one clear line."""
        if self.model not in ("resnet", "vgg"):
            raise UserError(f"--set model={self.model}: expected resnet or vgg")
        at_least(self, 1, "blocks")
        at_least(self, 0, "mlp_dim", "in_chans", "num_classes")
        try:
            widths = self.stage_widths
        except ValueError:
            widths = []
        if not widths or min(widths) < 1:
            raise UserError(f"--set widths={self.widths}: expected positive integers separated by commas, e.g. 16,32,64")
        if self.model == "resnet" and not self.batchnorm:
            raise UserError("--set batchnorm=false: only model=vgg can leave out BatchNorm")
        if self.model == "resnet" and self.mlp_dim:
            raise UserError(f"--set mlp_dim={self.mlp_dim}: only model=vgg has an MLP before the classifier")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--set dropout={self.dropout}: expected 0 <= dropout < 1")
        return self


PRESETS = {
    "resnet20": CNNConfig(),
    "resnet110": CNNConfig(blocks=18),
    "vgg13": CNNConfig(model="vgg", blocks=2, widths="64,128,256,512,512", batchnorm=False, mlp_dim=512),
    "vgg": CNNConfig(model="vgg", blocks=2, widths="32,64,128"),
}

# training hyperparameters used when the command line does not set them: "Pre-residual RN20"
DEFAULTS = dict(preset="resnet20", optimizer="sgd", momentum=0.9, lr=0.2, batch_size=256, epochs=30,
                weight_decay=2e-4, warmup=0, warmup_epochs=5, min_lr=1e-5, label_smoothing=0.0, clip=0.0,
                augment_data=("cifar10",))

# the VGG13 command's differences (both VGG presets use them)
PRESET_TRAINING = {
    "vgg13": dict(lr=0.05, batch_size=128, weight_decay=5e-4),
    "vgg": dict(lr=0.05, batch_size=128, weight_decay=5e-4),
}


def conv3x3(c_in, c_out, stride=1, bias=False):
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class PreActBlock(nn.Module):
    """x + conv(relu(bn(conv(relu(bn(x)))))); where the shape changes the shortcut is
    conv1x1(bn(x)) with the block's stride, as in the released cifar_resnet.py."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), conv3x3(c_in, c_out, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), conv3x3(c_out, c_out)
        self.relu = nn.ReLU()
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False))

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + (x if self.shortcut is None else self.shortcut(x))


class PreActResNet(nn.Module):
    def __init__(self, cfg: CNNConfig):
        super().__init__()
        widths = cfg.stage_widths
        self.stem = conv3x3(cfg.in_chans, widths[0])
        blocks, c_in = [], widths[0]
        for stage, width in enumerate(widths):
            for i in range(cfg.blocks):  # stride 2 at the start of every stage but the first
                blocks.append(PreActBlock(c_in, width, 2 if stage > 0 and i == 0 else 1))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Dropout(cfg.dropout), nn.Linear(c_in, cfg.num_classes))
        _init(self)

    def forward(self, images):                                    # (B, C, H, W) -> logits (B, classes)
        return self.head(self.blocks(self.stem(images)))


class VGG(nn.Module):
    def __init__(self, cfg: CNNConfig):
        super().__init__()
        layers, c_in = [], cfg.in_chans
        for width in cfg.stage_widths:
            for _ in range(cfg.blocks):
                layers += [conv3x3(c_in, width, bias=not cfg.batchnorm)]
                layers += [nn.BatchNorm2d(width)] if cfg.batchnorm else []
                layers += [nn.ReLU()]
                c_in = width
            layers.append(nn.MaxPool2d(2, ceil_mode=True))        # ceil: a 1x1 map stays 1x1
        self.features = nn.Sequential(*layers)
        head = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if cfg.mlp_dim:
            head += [nn.Linear(c_in, cfg.mlp_dim), nn.ReLU(), nn.Linear(cfg.mlp_dim, cfg.mlp_dim), nn.ReLU()]
            c_in = cfg.mlp_dim
        self.head = nn.Sequential(*head, nn.Dropout(cfg.dropout), nn.Linear(c_in, cfg.num_classes))
        _init(self)

    def forward(self, images):
        return self.head(self.features(images))


def _init(model):
    """He initialization of the convolutions (fan out, as the released code), BatchNorm 1 and 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build(cfg: CNNConfig) -> nn.Module:
    return (PreActResNet if cfg.model == "resnet" else VGG)(cfg)


# ----------------------------------------------------------------------------- training task


class Task(ImageTask):
    """Glue for recipes/train.py: the images at their own size and the net (channels and classes from the data)."""

    def __init__(self, args, hp, out_dir, device):
        data = load_images(args.data, args.data_dir)
        c = data.image_shape[0]
        cfg = replace(hp.model_config, in_chans=hp.model_config.in_chans or c,
                      num_classes=hp.model_config.num_classes or data.num_classes).check()
        if cfg.in_chans != c:
            raise UserError(f"--set in_chans={cfg.in_chans}: the images have {c} channels")
        if cfg.num_classes < data.num_classes:
            raise UserError(f"--set num_classes={cfg.num_classes}: the data has {data.num_classes} classes")
        super().__init__(data, hp, device)
        self.cfg = cfg
        self.model = build(cfg)
