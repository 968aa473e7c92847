"""Parameter and multiply-add counting for fixed networks.

Multiply-adds count convolutions and linear layers only (the convention of the OSNet paper's
Table 1 and of most re-ID model zoos): a conv contributes ``H_out * W_out * C_out * (C_in / groups) * k_h * k_w``,
a linear layer ``in * out`` per sample.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["count_parameters", "count_multiply_adds"]


def count_parameters(model: nn.Module, exclude: tuple[str, ...] = ()) -> int:
    """Number of parameters, skipping those whose name starts with one of ``exclude``."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(exclude))


@torch.no_grad()
def count_multiply_adds(model: nn.Module, input_size: tuple[int, int] = (256, 128)) -> int:
    """Multiply-adds of one forward pass of a single ``[1, 3, H, W]`` image (eval mode).

    Raises:
        RuntimeError: the model fails on an input of that size.
    """
    total = 0

    def conv_hook(m: nn.Conv2d, inp, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, *input_size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total
