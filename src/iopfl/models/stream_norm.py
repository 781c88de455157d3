"""Test-time BatchNorm over a stream of incoming batches, safe at batch size 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Weight of each new batch in the stream statistics. Measured on two held-out synthetic sites at test
# batch 1 and 2 (README, "Outside", small batches): 0.3 and 0.1 follow single slices too closely
# (5-15 Dice points below batches of 8); 0.03 and 0.01 reach batch 8's level, 0.01 slightly more often.
STREAM_MOMENTUM = 0.01


class StreamBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm of a test stream: input ``[B, C, H, W]`` → same shape.

    A batch of at least ``min_batch`` images is normalised with its own statistics (BN-adapt). A
    smaller batch — one slice at a time at a scanner console — would be normalised over one image
    per channel, which erases the contrast the network relies on, so it is normalised with the
    mixture of the stream's statistics (weight 1 − m) and its own (weight m): mean
    μ = (1 − m)·μ_s + m·μ_b, variance (1 − m)·σ²_s + m·σ²_b + m·(1 − m)·(μ_b − μ_s)². The stream
    statistics (μ_s, σ²_s) start at the expert's running statistics (the source sites') and move to
    that mixture after each predicted batch (eval mode) of any size — an exponential moving average
    over the incoming images, online and label-free. Loss forwards (train mode), and with them the
    augmented views, never move them. Gradients flow through the batch part only.
    """

    def __init__(self, source: nn.BatchNorm2d, min_batch: int, momentum: float = STREAM_MOMENTUM):
        super().__init__(source.num_features, source.eps, affine=source.affine, track_running_stats=False,
                         device=source.running_mean.device)
        if source.affine:  # the same Parameter objects: adapting them adapts this layer
            self.weight, self.bias = source.weight, source.bias
        self.min_batch, self.stream_momentum = min_batch, momentum
        self.register_buffer("stream_mean", source.running_mean.detach().clone())
        self.register_buffer("stream_var", source.running_var.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = x.shape[0] < self.min_batch
        if small or (not self.training and self.min_batch > 1):
            mean, var = self._mixture(x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False))
            if not self.training:  # a prediction: the stream moves
                self.stream_mean.copy_(mean.detach())
                self.stream_var.copy_(var.detach())
        if not small:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        shape = (1, -1, 1, 1)
        out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out

    def _mixture(self, mean_b: torch.Tensor, var_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance ``[C]`` of the stream (weight 1 − m) mixed with one batch (weight m)."""
        m, mean_s, var_s = self.stream_momentum, self.stream_mean, self.stream_var
        mean = (1 - m) * mean_s + m * mean_b
        var = (1 - m) * var_s + m * var_b + m * (1 - m) * (mean_b - mean_s) ** 2
        return mean, var
