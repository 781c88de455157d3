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
    mixture of the stream's statistics (weight 1 − m) and its own (weight m): mean
    μ = (1 − m)·μ_s + m·μ_b, variance (1 − m)·σ²_s + m·σ²_b + m·(1 − m)·(μ_b − μ_s)². The stream
    statistics (μ_s, σ²_s) start at the expert's running statistics (the source site's) and move to
    that mixture after each predicted batch (eval mode), of any size — an exponential moving average
    over the incoming images, online and label-free. Loss forwards (train mode) and augmented views
    never move them. Gradients flow through the batch part only.
    """

    def __init__(self, source: nn.BatchNorm2d, min_batch: int, momentum: float = 0.1, fallback: str = "ema"):
        super().__init__(source.num_features, source.eps, affine=source.affine, track_running_stats=False,
                         device=source.weight.device if source.affine else None)
        if source.affine:
            self.weight, self.bias = source.weight, source.bias
        self.min_batch, self.stream_momentum, self.fallback = min_batch, momentum, fallback
        self.register_buffer("stream_mean", source.running_mean.detach().clone())
        self.register_buffer("stream_var", source.running_var.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= self.min_batch:
            if not self.training and self.min_batch > 1:
                mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
                self._move_stream(mean.detach(), var.detach(), self.stream_momentum)
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if self.fallback == "running":
            return F.batch_norm(x, self.stream_mean, self.stream_var, self.weight, self.bias, False, 0.0, self.eps)
        m = self.stream_momentum
        mean_b, var_b = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        mean = (1 - m) * self.stream_mean + m * mean_b
        var = (1 - m) * self.stream_var + m * var_b + m * (1 - m) * (mean_b - self.stream_mean) ** 2
        if not self.training:
            self.stream_mean.copy_(mean.detach())
            self.stream_var.copy_(var.detach())
        shape = (1, -1, 1, 1)
        out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out

    @torch.no_grad()
    def _move_stream(self, mean: torch.Tensor, var: torch.Tensor, m: float) -> None:
        var_mix = (1 - m) * self.stream_var + m * var + m * (1 - m) * (mean - self.stream_mean) ** 2
        self.stream_mean.mul_(1 - m).add_(m * mean)
        self.stream_var.copy_(var_mix)
