"""``runtime verify``: the artifact's logits for its reference prompt against reference.safetensors.

Two checks: the relative error ‖out − ref‖ / ‖ref‖ over every position's logits, within a tolerance
set by the model dtype, and greedy next-token agreement (argmax) at every *decisive* position: one whose
reference top-two gap exceeds six times the RMS error over all logits. Below that, an argmax flip is within
the rounding of the error the first check already bounds (a near-tie), so it says nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import ArtifactError

TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 5e-2}
MIN_AGREEMENT = 1.0  # at decisive positions

@dataclass(frozen=True)
class VerifyResult:
    dtype: str
    positions: int
    rel_err: float
    tolerance: float
    agreement: float  # share of decisive positions whose argmax matches the reference's
    min_agreement: float
    decisive: int = 0  # positions whose reference top-two gap is above the dtype's noise

    @property
    def passed(self) -> bool:
        return self.rel_err <= self.tolerance and self.agreement >= self.min_agreement

    def lines(self) -> list[str]:
        verdict = "PASS" if self.passed else "FAIL"
        return [f"relative error  {self.rel_err:.3e}  (tolerance {self.tolerance:g} for {self.dtype})",
                f"greedy agreement {self.agreement:.1%} of {self.decisive} decisive positions of {self.positions}  "
                f"(needs {self.min_agreement:.0%})",
                verdict]


def compare(out: np.ndarray, ref: np.ndarray, dtype: str) -> VerifyResult:
    """out, ref: logits [len, V] (host arrays); the verdict for an artifact of model dtype ``dtype``."""
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise ArtifactError(f"logits have shape {tuple(out.shape)} but reference.safetensors holds "
                            f"{tuple(ref.shape)}: rebuild the artifact")
    rel = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
    top2 = -np.sort(-ref, axis=-1)[:, :2] if ref.shape[-1] >= 2 else np.concatenate([ref, ref], axis=-1)
    decisive = (top2[:, 0] - top2[:, 1]) > 6 * np.sqrt(np.mean((out - ref) ** 2))
    same = out.argmax(-1) == ref.argmax(-1)
    agree = float(same[decisive].mean()) if decisive.any() else 1.0
    return VerifyResult(dtype, ref.shape[0], rel, TOLERANCE[dtype], agree, MIN_AGREEMENT, int(decisive.sum()))


def verify_engine(engine) -> VerifyResult:
    """Run ``engine`` (runtime.Engine) on its artifact's reference prompt and compare."""
    ids, ref = engine.artifact.reference()
    return compare(engine.logits(ids), ref, engine.artifact.dtype)


def verify(path: str | Path, backend: str = "auto", kv_cache_gb: float | None = None) -> VerifyResult:
    """Load the artifact at ``path`` (hashes checked) on ``backend`` and verify it."""
    from runtime.engine import load

    return verify_engine(load(path, backend=backend, kv_cache_gb=kv_cache_gb, rehash=True))
