"""Programmatic dependent launch (sm_90): the wait and trigger every PDL-built kernel starts with.

A kernel launched with PDL may be scheduled while the kernel before it in the stream still runs. Before its
``griddepcontrol.wait`` it must not read or write anything; after it, everything every earlier kernel wrote is
visible (the previous kernel waited the same way before it ran, so the chain is transitive — which is why every
program of every PDL-built kernel waits, unconditionally, before anything else). What PDL buys is the launch edge:
the next kernel's programs are scheduled and waiting when this one finishes, instead of being launched after it.
On the H200 that is 5% of TinyLlama-1.1B's batch-1 decode step and 1-2% of Llama-3-8B's (benchmarks/results/
decode.md). Asking L2 for the next kernel's first weights before its wait (cp.async.bulk.prefetch.L2, 1 or 8 MB per
launch) was measured there too and made the step 1.1-1.7x slower, so weights are read after the wait, like
everything else.

``USE_PDL`` values (kernels.spec.PDL_TRIGGER): PDL_EARLY lets the next kernel be scheduled right after the wait,
PDL_LATE once the kernel has read its weights (matmuls; the other kernels trigger right after the wait either way).
"""
from __future__ import annotations

import triton
import triton.language as tl

PDL_EARLY = tl.constexpr(1)
PDL_LATE = tl.constexpr(2)


@triton.jit
def wait():
    """Wait for the previous kernel of the stream (its whole grid, its writes visible)."""
    tl.extra.cuda.gdc_wait()


@triton.jit
def launch_dependents():
    """Let the next kernel of the stream be scheduled (it waits for this one's completion before reading)."""
    tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def enter(USE_PDL: tl.constexpr):
    """The start of a kernel that streams no weights: wait, then let the next kernel be scheduled."""
    if USE_PDL:
        wait()
        launch_dependents()
