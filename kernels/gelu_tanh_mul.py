"""GeGLU activation: out = gelu_tanh(gate) * up, with gate and up side by side in one [T, 2I] row.

gelu_tanh(g) = 0.5 * g * (1 + tanh(sqrt(2/pi) * (g + 0.044715 g^3))), the approximation Gemma's MLP uses.
Layout, grid, configs and the kernel itself are silu_mul's (kernels/silu_mul.py), with its USE_GELU flag on.
"""

from __future__ import annotations

import math

import torch

from kernels import silu_mul as _glu
from kernels.spec import Config, KernelSpec, Plan

configs = _glu.configs
default = _glu.default


def plan(meta: dict, dtypes: dict, config: Config) -> Plan:
    return _glu.plan(meta, dtypes, config, use_gelu=True)


SPEC = KernelSpec("gelu_tanh_mul", configs, default, plan)


def gelu_tanh_mul(x: torch.Tensor, out: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """x [T, 2I] (gate | up) -> out [T, I] = gelu_tanh(gate) * up in x's dtype, through the kernel."""
    return _glu.glu(x, out, config, plan)


def reference(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] -> [T, I]: gelu_tanh(x[:, :I]) * x[:, I:], in fp32, cast to x's dtype."""
    gate, up = x.float().chunk(2, dim=-1)
    inner = math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate.pow(3))
    return (0.5 * gate * (1.0 + torch.tanh(inner)) * up).to(x.dtype)
