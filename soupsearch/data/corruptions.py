"""Corruption suite computed offline from an in-distribution split.

Each corruption maps images ``x [N, C, H, W]`` in ``[0, 1]`` to corrupted images at a
severity 1..5, deterministically for a seed. A shifted set is named
``<corruption>@<severity>``, e.g. ``gaussian_noise@3``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from soupsearch.errors import ConfigError

SEVERITIES = (1, 2, 3, 4, 5)
_CORRUPTIONS: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {}


def register_corruption(name: str):
    def deco(fn):
        _CORRUPTIONS[name] = fn
        return fn

    return deco


def list_corruptions() -> list[str]:
    return list(_CORRUPTIONS)


@register_corruption("gaussian_noise")
def _gaussian_noise(x, s, g):
    std = (0.08, 0.14, 0.22, 0.32, 0.45)[s - 1]
    return x + std * torch.randn(x.shape, generator=g)


@register_corruption("blur")
def _blur(x, s, g):
    sigma = (0.5, 0.75, 1.0, 1.3, 1.7)[s - 1] * x.shape[-1] / 16
    k = int(2 * round(3 * sigma) + 1)
    r = torch.arange(k, dtype=torch.float32) - k // 2
    w = torch.exp(-(r**2) / (2 * sigma**2))
    w = w / w.sum()
    c = x.shape[1]
    xp = F.pad(x, (k // 2,) * 4, mode="reflect") if k // 2 < x.shape[-1] else x
    xh = F.conv2d(xp, w.view(1, 1, 1, k).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(xh, w.view(1, 1, k, 1).repeat(c, 1, 1, 1), groups=c)


@register_corruption("rotation")
def _rotation(x, s, g):
    deg = (10.0, 20.0, 30.0, 40.0, 55.0)[s - 1]
    sign = torch.randint(0, 2, (x.shape[0],), generator=g).float() * 2 - 1
    theta = sign * deg * np.pi / 180
    cos, sin = torch.cos(theta), torch.sin(theta)
    A = torch.zeros(x.shape[0], 2, 3)
    A[:, 0, 0], A[:, 0, 1], A[:, 1, 0], A[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(A, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@register_corruption("contrast")
def _contrast(x, s, g):
    c = (0.6, 0.45, 0.3, 0.2, 0.12)[s - 1]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c + mean


@register_corruption("pixelate")
def _pixelate(x, s, g):
    frac = (0.6, 0.45, 0.35, 0.27, 0.2)[s - 1]
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * frac)), max(1, int(w * frac))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def parse_shift_name(name: str) -> tuple[str, int]:
    corr, _, sev = name.partition("@")
    if corr not in _CORRUPTIONS or not sev.isdigit() or int(sev) not in SEVERITIES:
        raise ConfigError(
            f"corruption {name!r}: expected '<name>@<1-5>' with name one of {', '.join(_CORRUPTIONS)}"
        )
    return corr, int(sev)


def corrupt(x: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply one corruption to float images in [0, 1]; returns a new float32 array."""
    if name not in _CORRUPTIONS:
        raise ConfigError(f"unknown corruption {name!r}; valid: {', '.join(_CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ConfigError(f"corruption {name}: severity {severity} not in 1..5")
    # one generator per (corruption, severity) so each set is reproducible on its own
    g = torch.Generator().manual_seed(seed * 1000 + list(_CORRUPTIONS).index(name) * 10 + severity)
    with torch.no_grad():
        out = _CORRUPTIONS[name](torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), severity, g)
    return out.clamp_(0.0, 1.0).numpy().astype(np.float32, copy=False)
