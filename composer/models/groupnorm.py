"""GroupNorm for channels_last training on the CPU.

torch 2.14's CPU kernel for GroupNorm's *backward* on NHWC tensors is very slow in bf16: 66.5 ms against
3.0 ms in NCHW for a 16 x 32 x 64 x 64 batch at one thread (PITFALLS, bench/model.py). Its forward in NHWC
is as fast as in NCHW. ``NHWCGroupNorm`` keeps the forward and takes the backward through the NCHW kernel:
the gradient and the saved input are laid out NCHW (two copies, ~1-4 ms each), the NCHW backward runs, and
the input's gradient goes back to NHWC. Everything else (CUDA, NCHW inputs, no grad, 3-D inputs) is
``nn.GroupNorm``'s own path, and the module keeps ``nn.GroupNorm``'s parameters and state-dict keys, so
checkpoints do not notice it.

    use_nhwc_group_norm(model)    # every nn.GroupNorm of model, in place; returns how many
"""

from __future__ import annotations

import torch
from torch import nn


class _GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        n, c = x.shape[:2]
        hw = x.numel() // (n * c)
        out, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, hw, groups, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups = groups
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        n, c = x.shape[:2]
        hw = x.numel() // (n * c)
        wanted = [ctx.needs_input_grad[0], ctx.has_weight and ctx.needs_input_grad[1],
                  ctx.has_bias and ctx.needs_input_grad[2]]
        dx, dw, db = torch.ops.aten.native_group_norm_backward(
            grad.contiguous(), x.contiguous(), mean, rstd, weight, n, c, hw, ctx.groups, wanted)
        if dx is not None:
            dx = dx.contiguous(memory_format=torch.channels_last)
        return dx, dw, db, None, None


class NHWCGroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose backward on channels_last CPU tensors runs the NCHW kernel (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() == 4 and x.device.type == "cpu" and torch.is_grad_enabled() and x.requires_grad
                and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)):
            return _GroupNormNHWC.apply(x, self.weight, self.bias, self.num_groups, self.eps)
        return super().forward(x)


def use_nhwc_group_norm(model: nn.Module) -> int:
    """Make every plain nn.GroupNorm of ``model`` an NHWCGroupNorm, in place; the number changed."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.GroupNorm:
            module.__class__ = NHWCGroupNorm
            changed += 1
    return changed
