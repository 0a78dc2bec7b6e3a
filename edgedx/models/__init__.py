"""Model architectures (TensorFlow side): a registry of Keras networks, one file per family."""

from . import mobilenetv2, resnet, seed_cnn  # noqa: F401  (registers the architectures)
from ._complexity import count_macs, count_parameters
from ._registry import create_model, list_architectures, register_architecture

__all__ = ["count_macs", "count_parameters", "create_model", "list_architectures", "register_architecture"]
