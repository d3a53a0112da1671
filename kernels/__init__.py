"""The trilite Triton kernel pack: one op per module, each with a jit kernel, a KernelSpec and a torch reference.

docs/ops.md lists every op with its tensor roles, shapes and attributes: the contract between the pack, the
compiler's graph and the runtime's backends.
"""
