"""The PyTorch reference for ``murajax.bench``: torchvision's DenseNet written out, eager mode.

A plain re-statement of ``torchvision.models.densenet169`` (torchvision is not installed here):
7x7/2 conv stem, BN, ReLU, 3x3/2 max pool, dense blocks of BN-ReLU-1x1 conv-BN-ReLU-3x3 conv
layers whose inputs are the concatenation of all earlier maps (``memory_efficient=False``),
transitions of BN-ReLU-1x1 conv-2x2 average pool, final BN, ReLU, global average pool, a linear
head with one output. Same layer shapes and parameter count as murajax's DenseNet-169 with
``num_outputs=1`` (12,486,145 parameters). Kaiming-normal conv init as torchvision does.

``TorchBench`` runs what one murajax training step does: forward in train mode (batch
statistics), the weighted binary cross-entropy written out, backward, one ``torch.optim.Adam``
step; and the eval step (eval mode, no grad). PyTorch is a benchmark-only dependency: nothing in
``murajax`` imports this file.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = {
    "densenet121": dict(block_sizes=(6, 12, 24, 16), growth_rate=32, initial_features=64,
                        bottleneck_width=4),
    "densenet161": dict(block_sizes=(6, 12, 36, 24), growth_rate=48, initial_features=96,
                        bottleneck_width=4),
    "densenet169": dict(block_sizes=(6, 12, 32, 32), growth_rate=32, initial_features=64,
                        bottleneck_width=4),
    "densenet201": dict(block_sizes=(6, 12, 48, 32), growth_rate=32, initial_features=64,
                        bottleneck_width=4),
    "densenet_tiny": dict(block_sizes=(2, 2, 2, 2), growth_rate=8, initial_features=16,
                          bottleneck_width=2),
}


class DenseLayer(nn.Module):
    def __init__(self, in_features: int, growth_rate: int, bottleneck_width: int):
        super().__init__()
        width = bottleneck_width * growth_rate
        self.norm1 = nn.BatchNorm2d(in_features)
        self.conv1 = nn.Conv2d(in_features, width, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, growth_rate, 3, padding=1, bias=False)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(list(inputs), 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class DenseBlock(nn.Module):
    def __init__(self, num_layers: int, in_features: int, growth_rate: int,
                 bottleneck_width: int):
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_features + i * growth_rate, growth_rate, bottleneck_width)
            for i in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = [x]
        for layer in self.layers:
            maps.append(layer(maps))
        return torch.cat(maps, 1)


class Transition(nn.Sequential):
    def __init__(self, in_features: int, out_features: int):
        super().__init__(
            nn.BatchNorm2d(in_features), nn.ReLU(),
            nn.Conv2d(in_features, out_features, 1, bias=False), nn.AvgPool2d(2, 2),
        )


class DenseNet(nn.Module):
    def __init__(self, block_sizes=(6, 12, 32, 32), growth_rate=32, initial_features=64,
                 bottleneck_width=4, compression=0.5, num_outputs=1):
        super().__init__()
        layers = [
            nn.Conv2d(3, initial_features, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(initial_features), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        ]
        features = initial_features
        for i, num_layers in enumerate(block_sizes):
            layers.append(DenseBlock(num_layers, features, growth_rate, bottleneck_width))
            features += num_layers * growth_rate
            if i != len(block_sizes) - 1:
                layers.append(Transition(features, int(features * compression)))
                features = int(features * compression)
        layers.append(nn.BatchNorm2d(features))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(features, num_outputs)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.features(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def create_model(name: str = "densenet169", num_outputs: int = 1) -> DenseNet:
    return DenseNet(**VARIANTS[name], num_outputs=num_outputs)


def weighted_bce(logits, label, weights):
    """-w [y log p + (1-y) log(1-p)], p = sigmoid(logit): murajax.steps.weighted_bce."""
    y = label.float()
    return -weights * (y * F.logsigmoid(logits) + (1.0 - y) * F.logsigmoid(-logits))


class TorchBench:
    """One training step (forward, weighted BCE, backward, Adam) and one eval step, eager."""

    def __init__(self, model: str = "densenet169", batch_size: int = 8, image_size: int = 224,
                 channels_last: bool = False, seed: int = 0):
        torch.manual_seed(seed)
        self.model = create_model(model)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4, betas=(0.9, 0.999),
                                          eps=1e-8)
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(batch_size, 3, image_size, image_size, generator=g).to(
            memory_format=self.memory_format)
        self.label = torch.randint(0, 2, (batch_size,), generator=g)
        self.weights = torch.rand(batch_size, generator=g) * 0.4 + 0.3
        self.mask = torch.ones(batch_size)
        self.batch_size = batch_size

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def train_step(self) -> float:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(self.images)[:, 0]
        loss = (weighted_bce(logits, self.label, self.weights) * self.mask).sum() / (
            self.mask.sum().clamp(min=1.0))
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def eval_step(self) -> torch.Tensor:
        self.model.eval()
        return torch.sigmoid(self.model(self.images)[:, 0])


def time_steps(fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


if __name__ == "__main__":
    import argparse
    import statistics

    parser = argparse.ArgumentParser(description="PyTorch eager DenseNet train/eval step speed")
    parser.add_argument("--model", default="densenet169", choices=sorted(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    bench = TorchBench(args.model, args.batch_size, args.image_size, args.channels_last)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{bench.num_parameters():,} parameters")
    train = statistics.median(time_steps(bench.train_step, args.steps, args.warmup))
    evaluate = statistics.median(time_steps(bench.eval_step, args.steps, args.warmup))
    print(f"train {args.batch_size / train:.2f} images/s ({train:.3f} s/step), "
          f"eval {args.batch_size / evaluate:.2f} images/s")
