"""Reference networks of the paper's experiments (Method page, section 8), framework-free.

* :class:`DVSResNet` / :func:`dvs_resnet19`: ResNet-19 of LIF neurons, DVS128 Gesture.
* :class:`SHDRecurrentNet` / :func:`shd_recurrent`: recurrent LIF 700-256-256-20, SHD.
* :class:`BinaryResNet` / :func:`cifar_resnet25`: ResNet-25 of binary units, CIFAR-10.
* :class:`SurrogateSpike`: Heaviside + surrogate gradient, for the deterministic twins
  (``bayes=False``) that share each network's layout.
* :func:`paper_recipe`: the released Adam with two learning rates and per-epoch cosine.
"""

from ._common import PAPER_BETA, StepAffine, StepBatchNorm
from .recipe import PAPER_CONFIGS, paper_lr_factor, paper_recipe
from .recurrent import SHDRecurrentNet, ZeroDiagBayesLinear, ZeroDiagLinear, shd_recurrent
from .resnet import (
    BinaryResNet,
    DVSResNet,
    Shortcut,
    SpikingResNet,
    cifar_resnet25,
    dvs_resnet19,
)
from .surrogate import SURROGATES, SurrogateSpike

__all__ = [
    "SurrogateSpike", "SURROGATES", "SpikingResNet", "DVSResNet", "BinaryResNet", "Shortcut",
    "SHDRecurrentNet", "ZeroDiagLinear", "ZeroDiagBayesLinear", "StepBatchNorm",
    "StepAffine", "PAPER_BETA", "paper_lr_factor",
    "dvs_resnet19", "shd_recurrent", "cifar_resnet25", "paper_recipe", "PAPER_CONFIGS",
]
