"""``runtime.memory.Memory`` over torch CPU tensors: what the interpret backend runs the Triton interpreter on."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from runtime.memory import Memory

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "i32": torch.int32,
                "i64": torch.int64, "u8": torch.uint8, "i8": torch.int8}
_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


class TorchMemory(Memory):
    """Host memory as torch tensors: staged inputs are written in place, copies are plain tensor copies."""

    host_visible = True

    def alloc(self, nbytes: int, zero: bool = False) -> Tensor:
        return (torch.zeros if zero else torch.empty)(nbytes, dtype=torch.uint8)

    def view(self, buf: Tensor, offset: int, shape: tuple[int, ...], dtype: str) -> Tensor:
        dt = TORCH_DTYPES[dtype]
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        return buf[offset:offset + n].view(dt).view(shape)

    def dtype_of(self, array: Tensor) -> str:
        return _NAMES[array.dtype]

    def write(self, dst: Tensor, src: np.ndarray) -> None:
        dst.copy_(torch.from_numpy(np.ascontiguousarray(src)).reshape(dst.shape))

    def read(self, src: Tensor) -> np.ndarray:
        return src.detach().float().numpy().copy() if src.dtype == torch.bfloat16 else src.numpy().copy()

    def copy(self, dst: Tensor, src: Tensor) -> None:
        dst.copy_(src)

    def gather(self, dst: Tensor, table: Tensor, index: Tensor) -> None:
        torch.index_select(table, 0, index, out=dst)

    def host(self, buf: Tensor) -> np.ndarray:
        return buf.numpy()
