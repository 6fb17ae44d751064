"""ResNet classifiers: the CIFAR ResNets of He et al. and torchvision's ResNets."""

from resnet_cifar.models.factory import MODELS, Classifier, build_model

__all__ = ["MODELS", "Classifier", "build_model"]
