"""Programmatic dependent launch (sm_90): the pieces every PDL-built kernel starts with.

A kernel launched with PDL may be scheduled while the kernel before it in the stream still runs. Before its
``griddepcontrol.wait`` it must not read anything an earlier kernel writes; after it, everything every earlier
kernel wrote is visible (the previous kernel waited the same way before it ran, so the chain is transitive —
which is why every program of every PDL-built kernel waits, unconditionally, before anything else).

What it may do before the wait is start reading what no kernel of the step writes: its weights. ``prefetch_rows``
asks the L2 for them with ``cp.async.bulk.prefetch.L2`` (the TMA unit fetches the bytes into L2; nothing comes back
to the SM, no register or shared memory is held), so the weight stream of a GEMV starts during the previous
kernel's tail instead of after it. The prefetch is an inline asm with side effects, like the wait itself, so
Triton keeps it in program order; loads of activations stay after the wait (tests/kernels/test_pdl.py checks the
PTX). A prefetch can never make a result wrong: L2 is the point of coherence of the GPU, and a prefetched line an
earlier kernel writes afterwards is simply updated there.

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
    """The start of a kernel that has nothing to prefetch: wait, then let the next kernel be scheduled."""
    if USE_PDL:
        wait()
        launch_dependents()


@triton.jit
def prefetch_rows(first_row_ptr, num_rows, row_bytes, ROW_STRIDE_BYTES: tl.constexpr):
    """Prefetch ``row_bytes`` bytes from each of ``num_rows`` (at most 32) rows into L2, the rows
    ROW_STRIDE_BYTES apart from ``first_row_ptr`` on. Thread r of the program's first warp issues row r; every
    address and ``row_bytes`` must be multiples of 16 (the bulk prefetch's rule). Scalars: one request per row."""
    tl.inline_asm_elementwise(
        """{
        .reg .pred p;
        .reg .u32 t;
        .reg .u64 a;
        mov.u32 t, %tid.x;
        setp.lt.u32 p, t, $2;
        mad.wide.u32 a, t, $3, $1;
        @p cp.async.bulk.prefetch.L2.global [a], $4;
        mov.u32 $0, 0;
        }""",
        "=r,l,r,r,r",
        [first_row_ptr.to(tl.int64), num_rows.to(tl.int32), tl.full([], ROW_STRIDE_BYTES, tl.int32),
         row_bytes.to(tl.int32)],
        dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_weights(
    w_ptr,  # [N, K]; [N, K / 2] u8 with W_INT4
    pid_n,
    pid_k,
    N: tl.constexpr,
    K: tl.constexpr,
    K_SPAN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    W_INT4: tl.constexpr,
    PDL_PREFETCH: tl.constexpr,
):
    """Before the PDL wait (a weight-streaming layout: a program owns BLOCK_N rows of W [N, K],
    one K_SPAN of them when split SPLIT_K ways): ask L2 for the start of this program's slice of W, its share
    of the launch's PDL_PREFETCH bytes, so the weight stream is under way while the previous kernel finishes
    (kernels/pdl.py). Rows whose bytes break the bulk prefetch's 16-byte rule are not prefetched."""
    ROW: tl.constexpr = K // 2 if W_INT4 else K  # elements of w per row
    SPAN: tl.constexpr = K_SPAN // 2 if W_INT4 else K_SPAN
    EB: tl.constexpr = w_ptr.dtype.element_ty.primitive_bitwidth // 8
    PROGRAMS: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N * SPLIT_K
    PER_ROW: tl.constexpr = min(SPAN * EB, PDL_PREFETCH // (PROGRAMS * BLOCK_N)) // 16 * 16
    if (ROW * EB) % 16 == 0 and (SPAN * EB) % 16 == 0 and PER_ROW >= 128:
        first = pid_n * BLOCK_N
        lo = pid_k * SPAN
        # The last split may be short, or start past K.
        nbytes = tl.minimum(PER_ROW, (ROW - lo) * EB)
        for r0 in tl.static_range(0, BLOCK_N, 32):
            rows = tl.minimum(N - first - r0, 32)
            rows = tl.where(nbytes > 0, tl.maximum(rows, 0), 0)
            prefetch_rows(w_ptr + (first + r0) * ROW + lo, rows, nbytes, ROW_STRIDE_BYTES=ROW * EB)
