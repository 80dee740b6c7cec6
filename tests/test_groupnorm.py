"""NHWCGroupNorm: the same outputs and gradients as nn.GroupNorm, on NHWC and NCHW, fp32 and bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from composer.models.groupnorm import NHWCGroupNorm, use_nhwc_group_norm


def _pair(channels: int, groups: int, affine: bool = True):
    torch.manual_seed(0)
    reference = nn.GroupNorm(groups, channels, affine=affine)
    if affine:
        with torch.no_grad():
            reference.weight.normal_()
            reference.bias.normal_()
    fast = nn.GroupNorm(groups, channels, affine=affine)
    fast.load_state_dict(reference.state_dict())
    assert use_nhwc_group_norm(nn.Sequential(fast)) == 1 and isinstance(fast, NHWCGroupNorm)
    return reference, fast


def _run(module, x, grad, autocast: bool):
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = module(x)
    out.backward(grad.to(out.dtype))
    params = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return out, x.grad, params


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_group_norm(memory_format, dtype, autocast, affine):
    reference, fast = _pair(16, 4, affine)
    x = (torch.randn(3, 16, 6, 5) * 2 + 1).to(dtype).contiguous(memory_format=memory_format)
    grad = torch.randn(3, 16, 6, 5).contiguous(memory_format=memory_format)
    expected, got = _run(reference, x, grad, autocast), _run(fast, x, grad, autocast)
    tolerance = 1e-5 if dtype == torch.float32 and not autocast else 3e-2
    assert got[0].dtype == expected[0].dtype
    assert got[1].dtype == expected[1].dtype
    torch.testing.assert_close(got[0].float(), expected[0].float(), atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(got[1].float(), expected[1].float(), atol=tolerance, rtol=tolerance)
    for a, b in zip(got[2], expected[2]):
        torch.testing.assert_close(a, b, atol=tolerance * 10, rtol=tolerance)
    if memory_format == torch.channels_last:  # the input's gradient keeps the input's layout
        assert got[1].is_contiguous(memory_format=torch.channels_last)


def test_state_dict_keys_do_not_change_and_no_grad_uses_the_plain_path():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Sequential(nn.GroupNorm(4, 8)))
    keys = list(model.state_dict())
    assert use_nhwc_group_norm(model) == 2 and use_nhwc_group_norm(model) == 0
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(x)
    assert out.grad_fn is None and out.shape == (2, 8, 7, 7)


def test_memory_format_auto_and_what_apply_does():
    from composer.train.loop import apply_memory_format, resolve_memory_format

    assert resolve_memory_format("auto", "cpu", "bf16") == "channels_last"
    assert resolve_memory_format("auto", "cpu", "no") == "contiguous"
    assert resolve_memory_format("auto", "cuda", "bf16") == "contiguous"
    assert resolve_memory_format("contiguous", "cpu", "bf16") == "contiguous"
    with pytest.raises(ValueError, match="train.memory_format must be auto, channels_last, contiguous"):
        resolve_memory_format("nhwc", "cpu", "bf16")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8))
    assert apply_memory_format(model, "auto", "cpu", "bf16") == "channels_last"
    assert isinstance(model[1], NHWCGroupNorm) and model[0].weight.is_contiguous(memory_format=torch.channels_last)
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8))
    assert apply_memory_format(other, "auto", "cpu", "no") == "contiguous"
    assert type(other[1]) is nn.GroupNorm and other[0].weight.is_contiguous()
