"""Emulator-assisted tuning: the foundation model, its emulators and the training they share.

* :mod:`.foundation` ``load_foundation`` (the shipped default model, or pretraining on a corpus)
* :mod:`.emulator`   ``EmulatorSpec`` and ``build``: layer-drop emulators with the adapter blocks kept
* :mod:`.distill`    knowledge distillation of an emulator's middle blocks (cached per foundation)
* :mod:`.train`      ``fit``: chunked jitted training with checkpoints; ``lm_objective``
* :mod:`.offsite`    the Offsite-Tuning table (`fedpeat offsite-table`)
* :mod:`.pretrained` a model directory (the shipped one or a Hugging Face GPT-2) for `fedpeat tune`
"""

from fedpeat_jax.peat.emulator import EmulatorSpec, build
from fedpeat_jax.peat.foundation import Foundation, PretrainConfig, load_foundation
from fedpeat_jax.peat.train import TrainConfig, evaluate_perplexity, fit, lm_objective

__all__ = [
    "EmulatorSpec",
    "Foundation",
    "PretrainConfig",
    "TrainConfig",
    "build",
    "evaluate_perplexity",
    "fit",
    "lm_objective",
    "load_foundation",
]
