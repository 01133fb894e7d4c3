"""Models: pre-activation WideResNet with per-stage depth/width, CIFAR ResNet-18 / PreActResNet-18 (both
shortcut variants), the DeepMind-style WideResNet / PreActResNet with in-model normalisation, a name-keyed
registry and per-stage parameter/MAC descriptions. All models take inputs in [0, 1] and return logits;
their Lipschitz graphs come from tracing (``lipschitz.graph_from_module``)."""
from experiments.models.describe import ModelDescription, describe
from experiments.models.dm import DMPreActResNet, DMWideResNet
from experiments.models.layers import ACTIVATIONS, InputNormalization
from experiments.models.registry import (
    FAMILIES,
    create_model,
    family_of,
    list_models,
    model_config,
    model_from_config,
    preset_spec,
    register_model,
)
from experiments.models.resnet import PreActResNet, ResNet
from experiments.models.wideresnet import WideBasicBlock, WideResNet

__all__ = [
    "ACTIVATIONS",
    "DMPreActResNet",
    "DMWideResNet",
    "FAMILIES",
    "InputNormalization",
    "ModelDescription",
    "PreActResNet",
    "ResNet",
    "WideBasicBlock",
    "WideResNet",
    "create_model",
    "describe",
    "family_of",
    "list_models",
    "model_config",
    "model_from_config",
    "preset_spec",
    "register_model",
]
