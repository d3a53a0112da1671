"""The torch backend: runs the graph node by node with each op's plain-torch ``reference()``.

No Triton kernel runs here, so it works on any torch device, CPU included: it is how a machine
without a GPU serves a model, and the yardstick the kernel backends are checked against. KV caches
are persistent tensors [num_blocks, block_size, Hk, Dh] in the model dtype, updated in place.
A quantized matmul weight (and lm_head) is dequantized once, at its first use, and the fp32 result kept: the
references would otherwise dequantize every weight at every step (SmolLM2's GGUF blocks: seconds per token).
This is the references' own dequantization, done once, so the numbers are the same; the memory is fp32's.
The references live in the kernel pack's modules, which import Triton: this backend needs the compile extra.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from artifact_format.graph import QUANT_ROLES
from runtime.artifact import Artifact
from runtime.backends.base import Backend, num_kv_blocks, physical_memory
from runtime.errors import needs_compile_extra
from runtime.step import StepInput

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "i32": torch.int32,
          "i64": torch.int64, "i8": torch.int8, "u8": torch.uint8}
# Ops whose quantized weight is read whole every step, dequantized once (the embedding reads a few rows: left as is).
_DENSE_OPS = ("linear", "rms_norm_linear", "logits")
# Share of the machine's RAM the default KV cache may take on the CPU.
CPU_KV_SHARE = 0.25


class _Reference:
    """An op's reference() with the parameter names it accepts, so node roles and attrs can be filtered."""

    def __init__(self, op: str) -> None:
        with needs_compile_extra("the torch backend"):  # the references live beside their kernels, under Triton
            module = importlib.import_module(f"kernels.{op}")
        self.fn: Callable = module.reference
        params = inspect.signature(self.fn).parameters.values()
        self.any_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        self.names = {p.name for p in params}

    def __call__(self, inputs: dict[str, Tensor], attrs: dict) -> Tensor | tuple[Tensor, ...]:
        keep = lambda d: d if self.any_kw else {k: v for k, v in d.items() if k in self.names}
        return self.fn(**keep(inputs), **keep(attrs))


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, artifact: Artifact, kv_cache_gb: float | None = None, max_blocks_total: int | None = None,
                 device: str | torch.device = "cpu") -> None:
        super().__init__(artifact, kv_cache_gb, max_blocks_total)
        self._refs: dict[str, _Reference] = {}
        self._dense_weights: dict[str, Tensor] = {}
        self._ref("sampling")  # without the compile extra this fails here, not at the first step
        self.device = torch.device(device)
        self.graph = artifact.graph
        if self.device.type == "cpu":
            total, where = physical_memory(), "this machine's RAM"
            budget = int(total * CPU_KV_SHARE)
        else:
            free, total = torch.cuda.mem_get_info(self.device)
            budget, where = int(free * 0.5), "this GPU"
        self.num_blocks = num_kv_blocks(artifact, kv_cache_gb, max_blocks_total, budget, total, where)
        self.weights = artifact.weights(str(self.device))
        missing = [t.name for t in self.graph.by_kind("weight") if t.name not in self.weights]
        if missing:
            raise KeyError(f"weights.safetensors lacks graph weights {missing[:5]}")
        # empty, not zeros: attention reads only a sequence's first seq_len tokens, all written by then, and
        # filling gigabytes of cache would cost seconds at start-up on the CPU. Only source caches get memory:
        # the names cache-writing nodes produce are bound, as they run, to the buffers they wrote into.
        self.caches = {t.name: torch.empty(tuple(self.num_blocks if d == "NB" else d for d in t.shape),
                                           dtype=DTYPES[t.dtype], device=self.device)
                       for t in self.graph.sources("cache")}

    def _dense(self, name: str, w: Tensor, scale: Tensor) -> Tensor:
        """The fp32 weight a quantized matmul computes with (kernels/weight_quant.py dequantize), made once."""
        if name not in self._dense_weights:
            from kernels.weight_quant import dequantize

            self._dense_weights[name] = dequantize(w, scale)
        return self._dense_weights[name]

    def _ref(self, op: str) -> _Reference:
        if op not in self._refs:
            self._refs[op] = _Reference(op)
        return self._refs[op]

    def forward(self, step: StepInput) -> np.ndarray:
        """Logits [R, V] fp32 on the host (numpy), as every backend returns them."""
        return self.forward_tensor(step).cpu().numpy()

    @torch.inference_mode()
    def forward_tensor(self, step: StepInput) -> Tensor:
        """Logits [R, V] fp32 as a tensor on ``self.device``: the step arrays enter torch here."""
        env: dict[str, Tensor] = {**self.weights, **self.caches}
        env.update({k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in step.inputs().items()})
        for node in self.graph.nodes:
            op = node.op
            if op == "attention":
                op = "attention_decode" if step.kind == "decode" else "attention_prefill"
            inputs = {role: env[name] for role, name in node.inputs}
            if op in _DENSE_OPS and node.attr("quant"):
                w_role, s_role = QUANT_ROLES[op]
                inputs[w_role] = self._dense(node.input(w_role), inputs[w_role], inputs.pop(s_role))
            result = self._ref(op)(inputs, dict(node.attrs))
            results = result if isinstance(result, tuple) else (result,)
            if len(results) != len(node.outputs):
                raise RuntimeError(f"{op} reference returned {len(results)} outputs for {len(node.outputs)} roles")
            for (_, name), value in zip(node.outputs, results):
                env[name] = value
            # An in-place op must leave its result in the input's storage (the persistent KV cache).
            for out_role, in_role in node.aliases:
                src, dst = env[node.output(out_role)], inputs[in_role]
                if src.data_ptr() != dst.data_ptr():
                    dst.copy_(src)
                    env[node.output(out_role)] = dst
        return env[self.graph.outputs[0]].float()

    @torch.inference_mode()
    def sample(self, logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
               min_p: np.ndarray, seeds: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Token ids [R] int32 (numpy) from the sampling op's reference; host arrays in, converted here."""
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        ids = self._ref("sampling").fn(t(logits), t(temperature), t(top_k), t(top_p), t(min_p), t(seeds), t(offsets))
        return ids.cpu().numpy().astype(np.int32, copy=False)
