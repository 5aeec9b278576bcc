"""Inference-time folding of BatchNorm into the convolution before it."""

from __future__ import annotations

from itertools import pairwise

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from models.c3d import C3D

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution into it, in place; returns the model.

    Same outputs (to float rounding) for ~1.2× the CPU throughput: normalization over full-resolution
    activations is a fifth of a small C3D's time. Uses the running statistics, so the model must be in eval
    mode; a fused model is for prediction only (`save_model` refuses it, train and save the unfused one).
    """
    if model.training:
        raise ValueError("fuse_for_inference: call model.eval() first (folding uses the running statistics)")
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (conv_name, conv), (norm_name, norm) in pairwise(children):
                if isinstance(conv, _CONVS) and isinstance(norm, _NORMS):
                    setattr(module, conv_name, fuse_conv_bn_eval(conv, norm))
                    setattr(module, norm_name, nn.Identity())
        elif isinstance(module, C3D) and module.norms is not None:
            for name, norm in module.norms.items():
                if isinstance(norm, _NORMS):
                    setattr(module, name, fuse_conv_bn_eval(getattr(module, name), norm))
                    module.norms[name] = nn.Identity()
    model.fused_for_inference = True
    return model
