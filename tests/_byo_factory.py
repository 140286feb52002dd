"""A user's own classifier, as a factory the config names (`classifier.factory: "_byo_factory:build"`).

Stands for code outside this project: nothing here imports explainer. The tests put tests/ on PYTHONPATH, as a user
would put their package there.
"""

from __future__ import annotations

from torch import nn


class UserNet(nn.Module):
    """Conv-BN-ReLU blocks, global average pooling and a dropout head: BatchNorm and dropout make freezing matter."""

    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(1), nn.Dropout(0.3), nn.Linear(2 * width, num_classes))

    def forward(self, x):
        return self.head(self.pool(self.body(x)))


def build(num_classes: int = 4, width: int = 8) -> nn.Module:
    return UserNet(num_classes, width)
