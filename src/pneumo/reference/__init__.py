"""A from-scratch NumPy neural network: the layers, losses and optimizers of the course notes.

It never imports torch: it is the readable reference that the torch model is checked against.
"""

from pneumo.reference.layers import (
    AvgPool2d,
    BatchNorm2d,
    Container,
    Conv2d,
    Dropout,
    Flatten,
    GlobalAvgPool2d,
    Layer,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
    Sigmoid,
    sigmoid,
)
from pneumo.reference.losses import BCELoss, BCEWithLogitsLoss, MSELoss
from pneumo.reference.optim import SGD, Adam
from pneumo.reference.small_cnn import SmallCNN

__all__ = [
    "Adam",
    "AvgPool2d",
    "BCELoss",
    "BCEWithLogitsLoss",
    "BatchNorm2d",
    "Container",
    "Conv2d",
    "Dropout",
    "Flatten",
    "GlobalAvgPool2d",
    "Layer",
    "Linear",
    "MSELoss",
    "MaxPool2d",
    "ReLU",
    "SGD",
    "Sequential",
    "Sigmoid",
    "SmallCNN",
    "sigmoid",
]
