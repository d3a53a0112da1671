"""Paged KV cache bookkeeping: a free list of fixed-size blocks and one block table per sequence.

The cache tensors themselves ([num_blocks, block_size, Hk, Dh] per layer) belong to the backend;
this module only decides which block holds which token: token p of a sequence lives in block
``table[p // block_size]`` at offset ``p % block_size``.
"""

from __future__ import annotations

from collections import deque


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


class BlockAllocator:
    """A free list over block ids 0 .. num_blocks-1.

    Freed blocks go to the back of the list, so a block just released is the last one reused: a bug
    that reads a stale block shows up as wrong numbers rather than hiding behind identical contents.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks; raises RuntimeError when fewer are free (callers check ``num_free`` first)."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with only {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise RuntimeError(f"KV block {b} freed twice or never allocated")
            self._used.remove(b)
            self._free.append(b)


class BlockTable:
    """The blocks of one sequence, in token order."""

    def __init__(self, allocator: BlockAllocator, block_size: int) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.blocks: list[int] = []
        # Leading blocks already given back (drop_before): their entries stay, so positions still index the
        # table, but no kernel reads them and the allocator may have handed them to another sequence.
        self.dropped = 0

    @property
    def capacity(self) -> int:
        """Tokens the table can hold without another block."""
        return len(self.blocks) * self.block_size

    def missing(self, num_tokens: int) -> int:
        """Blocks still to allocate before the table holds ``num_tokens`` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(self.blocks))

    def ensure(self, num_tokens: int) -> bool:
        """Grow to hold ``num_tokens`` tokens; all or nothing. False (and no change) when blocks are short."""
        need = self.missing(num_tokens)
        if need > self.allocator.num_free:
            return False
        self.blocks.extend(self.allocator.allocate(need))
        return True

    def drop_before(self, position: int) -> int:
        """Give back the blocks whose tokens all sit before ``position`` (no query of a sliding-window model will
        read them again); returns how many went."""
        n = min(max(0, position) // self.block_size, len(self.blocks))
        if n <= self.dropped:
            return 0
        self.allocator.free(self.blocks[self.dropped:n])
        gone, self.dropped = n - self.dropped, n
        return gone

    def release(self) -> None:
        self.allocator.free(self.blocks[self.dropped:])
        self.blocks = []
        self.dropped = 0

    def slots(self, start: int, n: int) -> list[int]:
        """Cache slots (block * block_size + offset) of tokens ``start .. start+n-1``."""
        bs = self.block_size
        return [self.blocks[p // bs] * bs + p % bs for p in range(start, start + n)]
