"""Models: pre-activation WideResNet with per-stage depth/width, CIFAR ResNet-18 / PreActResNet-18, a
name-keyed registry and per-stage parameter/MAC descriptions. All models take inputs in [0, 1], return
logits; their Lipschitz graphs come from tracing (``lipschitz.graph_from_module``)."""
from experiments.models.describe import ModelDescription, describe
from experiments.models.layers import ACTIVATIONS, InputNormalization
from experiments.models.registry import (
    FAMILIES,
    create_model,
    list_models,
    model_config,
    model_from_config,
    register_model,
)
from experiments.models.resnet import PreActResNet, ResNet
from experiments.models.wideresnet import WideBasicBlock, WideResNet

__all__ = [
    "ACTIVATIONS",
    "FAMILIES",
    "InputNormalization",
    "ModelDescription",
    "PreActResNet",
    "ResNet",
    "WideBasicBlock",
    "WideResNet",
    "create_model",
    "describe",
    "list_models",
    "model_config",
    "model_from_config",
    "register_model",
]
