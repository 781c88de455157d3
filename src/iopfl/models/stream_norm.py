"""Test-time BatchNorm over a stream of incoming batches, safe at batch size 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StreamBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm of a test stream: input ``[B, C, H, W]`` → same shape.

    A batch of at least ``min_batch`` images is normalised with its own statistics (BN-adapt). A
    smaller batch — one slice at a time at a scanner console — would be normalised over one image
    per channel, which erases the contrast the network relies on, so it is normalised with the
    statistics of the stream so far: the pooled mean and variance of every image predicted before it
    and of itself, plus ``min_batch`` pseudo-images carrying the expert's running statistics (the
    source sites') as a prior. With n₀ = ``min_batch``, N images seen and a batch of n, the batch gets
    weight m = n / (n₀ + N + n): μ = (1 − m)·μ_s + m·μ_b, σ² = (1 − m)·σ²_s + m·σ²_b + m·(1 − m)·(μ_b − μ_s)².
    The stream statistics (μ_s, σ²_s, N) move to that after each predicted batch (eval mode) of any
    size; loss forwards (train mode), and with them the augmented views, never move them. Online and
    label-free; gradients flow through the batch part only.

    Why a pooled mean rather than an exponential moving average: measured at test batch 1 (docs/results.md,
    small test batches), an EMA with momentum 0.01 scores about 2 points higher over a long
    stream (128 slices) but barely leaves the source statistics over one short case (16 slices), where
    routing, whose mixed kernels do not match those statistics, then fell to half its batch-4 Dice;
    momenta 0.1 and 0.3 follow single slices too closely (5-15 points below batches of 8).
    """

    stream_mean: torch.Tensor  # [C]
    stream_var: torch.Tensor  # [C]
    seen: torch.Tensor  # [] images predicted so far

    def __init__(self, source: nn.BatchNorm2d, min_batch: int):
        running_mean, running_var = source.running_mean, source.running_var
        if running_mean is None or running_var is None:
            raise ValueError("StreamBatchNorm2d needs a BatchNorm2d that tracks running statistics (the prior)")
        super().__init__(
            source.num_features, source.eps, affine=source.affine, track_running_stats=False, device=running_mean.device
        )
        if source.affine:  # the same Parameter objects: adapting them adapts this layer
            self.weight, self.bias = source.weight, source.bias
        self.min_batch = min_batch
        self.register_buffer("stream_mean", running_mean.detach().clone())
        self.register_buffer("stream_var", running_var.detach().clone())
        self.register_buffer("seen", torch.zeros((), device=running_mean.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = x.shape[0] < self.min_batch
        if small or (not self.training and self.min_batch > 1):
            mean, var = self._pooled(x)
            if not self.training:  # a prediction: the stream moves
                self.stream_mean.copy_(mean.detach())
                self.stream_var.copy_(var.detach())
                self.seen += x.shape[0]
        if not small:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        shape = (1, -1, 1, 1)
        out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out

    def _pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance ``[C]`` of the stream so far pooled with the batch ``x``."""
        mean_b, var_b = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        m = x.shape[0] / (self.min_batch + self.seen + x.shape[0])
        mean = (1 - m) * self.stream_mean + m * mean_b
        var = (1 - m) * self.stream_var + m * var_b + m * (1 - m) * (mean_b - self.stream_mean) ** 2
        return mean, var
