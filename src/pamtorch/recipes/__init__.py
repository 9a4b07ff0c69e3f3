"""Training recipes: small readable models built from stock torch.nn modules, trained by
``pamtorch train RECIPE`` (see :mod:`pamtorch.recipes.train`).

* ``vit``: DeiT-style vision transformer (:mod:`pamtorch.recipes.vit`)
* ``cnn``: pre-activation ResNet-20/110 and VGG, the paper's CNN experiments (:mod:`pamtorch.recipes.cnn`)
* ``translate``: encoder-decoder transformer, IWSLT14-style (:mod:`pamtorch.recipes.translate`)
* ``lm``: decoder-only character/BPE language model (:mod:`pamtorch.recipes.lm`)

Modules are imported lazily: importing this package needs only torch.
"""

RECIPES = ("vit", "cnn", "translate", "lm")

__all__ = ["RECIPES"]
