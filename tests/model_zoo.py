"""Tiny random-init stock models, each with a fixed batch and its loss, as a user would
train them: unmodified modules, stock loss, stock ``torch.optim.AdamW`` and
``clip_grad_norm_``. Shared by tests/test_models.py and benchmarks/models.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Case:
    name: str
    family: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple]
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    needs: str = ""          # a package the case imports ("transformers")
    lr: float = 3e-3
    eval_mode: bool = True   # False: judge the loss with batch statistics (see exact_loss)


def _tokens(v, shape):
    return lambda g: (torch.randint(0, v, shape, generator=g),)


def _images(shape, classes):
    return lambda g: (torch.randn(*shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g))


def _hf_loss(model, batch):
    return model(**batch[0]).loss


# -- HF transformers -----------------------------------------------------------------

def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))


def _bert():
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(
        num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
        vocab_size=64, max_position_embeddings=16, num_labels=3))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=32,
        intermediate_size=64, vocab_size=64, max_position_embeddings=16))


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration
    return T5ForConditionalGeneration(T5Config(
        num_layers=2, num_decoder_layers=2, num_heads=2, d_model=32, d_kv=16, d_ff=64,
        vocab_size=64, decoder_start_token_id=0))


def _bart():
    from transformers import BartConfig, BartForConditionalGeneration
    return BartForConditionalGeneration(BartConfig(
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64,
        max_position_embeddings=32))


def _vit():
    from transformers import ViTConfig, ViTForImageClassification
    return ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=5))


def _resnet():
    from transformers import ResNetConfig, ResNetForImageClassification
    return ResNetForImageClassification(ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5))


def _convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification
    return ConvNextForImageClassification(ConvNextConfig(
        num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5, patch_size=2))


def _mobilenet():
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification
    return MobileNetV2ForImageClassification(MobileNetV2Config(
        image_size=32, depth_multiplier=0.25, num_labels=5, classifier_dropout_prob=0.0))


def _lm_batch(g, v=64, shape=(2, 12)):
    ids = torch.randint(0, v, shape, generator=g)
    return ({"input_ids": ids, "labels": ids},)


def _cls_batch(g):
    ids = torch.randint(0, 64, (4, 12), generator=g)
    return ({"input_ids": ids, "labels": torch.randint(0, 3, (4,), generator=g)},)


def _s2s_batch(g):
    src = torch.randint(2, 64, (2, 10), generator=g)
    return ({"input_ids": src, "labels": torch.randint(2, 64, (2, 8), generator=g)},)


def _img_batch(size, classes=5):
    def make(g):
        return ({"pixel_values": torch.randn(4, 3, size, size, generator=g),
                 "labels": torch.randint(0, classes, (4,), generator=g)},)
    return make


# -- torch.nn ------------------------------------------------------------------------

class _Seq(nn.Module):
    """A recurrent or 1-D model over a token sequence, classifying the last step."""

    def __init__(self, core: str):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.core_kind = core
        if core == "conv1d":
            self.core = nn.Conv1d(16, 16, 3, padding=1)
        else:
            self.core = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[core](16, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.emb(x)
        if self.core_kind == "conv1d":
            h = torch.relu(self.core(h.transpose(1, 2))).transpose(1, 2)
        else:
            h = self.core(h)[0]
        return self.head(h[:, -1])


def _seq_batch(g):
    return (torch.randint(0, 32, (4, 8), generator=g), torch.randint(0, 4, (4,), generator=g))


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _conv_net(kind):
    def build():
        if kind == "conv3d":
            return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                                 nn.Flatten(), nn.Linear(4, 3))
        if kind == "convtranspose2d":
            return nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        norm = {"batchnorm2d": lambda: nn.BatchNorm2d(8), "groupnorm": lambda: nn.GroupNorm(2, 8),
                "instancenorm2d": lambda: nn.InstanceNorm2d(8, affine=True)}[kind]
        return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), norm(), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1), norm(), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    return build


def _vol_batch(g):
    return (torch.randn(4, 2, 6, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g))


def _img2_batch(g):
    return (torch.randn(4, 2, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g))


CASES = [
    Case("gpt2", "HF GPT-2", _gpt2, _lm_batch, _hf_loss, "transformers"),
    Case("bert", "HF BERT", _bert, _cls_batch, _hf_loss, "transformers"),
    Case("llama", "HF Llama", _llama, _lm_batch, _hf_loss, "transformers"),
    Case("t5", "HF T5", _t5, _s2s_batch, _hf_loss, "transformers"),
    Case("bart", "HF BART", _bart, _s2s_batch, _hf_loss, "transformers"),
    Case("vit", "HF ViT", _vit, _img_batch(16), _hf_loss, "transformers"),
    Case("resnet", "HF ResNet", _resnet, _img_batch(32), _hf_loss, "transformers"),
    Case("convnext", "HF ConvNeXt", _convnext, _img_batch(32), _hf_loss, "transformers"),
    Case("mobilenet_v2", "HF MobileNetV2", _mobilenet, _img_batch(32), _hf_loss, "transformers",
         eval_mode=False),
    Case("lstm", "nn.LSTM", lambda: _Seq("lstm"), _seq_batch, _ce),
    Case("gru", "nn.GRU", lambda: _Seq("gru"), _seq_batch, _ce),
    Case("rnn", "nn.RNN", lambda: _Seq("rnn"), _seq_batch, _ce),
    Case("conv1d", "nn.Conv1d", lambda: _Seq("conv1d"), _seq_batch, _ce),
    Case("conv3d", "nn.Conv3d", _conv_net("conv3d"), _vol_batch, _ce, lr=2e-2),
    Case("convtranspose2d", "nn.ConvTranspose2d", _conv_net("convtranspose2d"), _img2_batch, _ce),
    Case("batchnorm2d", "nn.BatchNorm2d", _conv_net("batchnorm2d"), _img2_batch, _ce),
    Case("groupnorm", "nn.GroupNorm", _conv_net("groupnorm"), _img2_batch, _ce),
    Case("instancenorm2d", "nn.InstanceNorm2d", _conv_net("instancenorm2d"), _img2_batch, _ce),
]


def make(case: Case, seed: int = 0):
    """(model, batch, optimizer) for ``case``, seeded."""
    torch.manual_seed(seed)
    model = case.build()
    model.train()
    batch = case.batch(torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=case.lr)
    return model, batch, opt


def train_step(case: Case, model, batch, opt):
    loss = case.loss(model, batch)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()


def exact_loss(case: Case, model, batch) -> float:
    """The loss in exact fp32, in eval mode (no dropout, running norm statistics); for a
    case with ``eval_mode=False`` (HF MobileNetV2: momentum 0.997 makes its BatchNorm running
    statistics those of the last batch before the last update, and its eval-mode loss swings
    from step to step in fp32 as in PA) in train mode with batch statistics, the buffers
    restored afterwards."""
    was = model.training
    buffers = {k: v.clone() for k, v in model.state_dict().items() if k in dict(model.named_buffers())}
    model.train(not case.eval_mode)
    with torch.no_grad():
        out = case.loss(model, batch).item()
    model.load_state_dict(buffers, strict=False)
    model.train(was)
    return out
