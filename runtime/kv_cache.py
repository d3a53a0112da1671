"""Paged KV cache bookkeeping: reference-counted blocks, prefix keys, and one block table per sequence.

The cache tensors themselves ([num_blocks, block_size, Hk, Dh] per layer) belong to the backend;
this module only decides which block holds which token: token p of a sequence lives in block
``table[p // block_size]`` at offset ``p % block_size``.

Prefix caching: a full block whose KV is written can be keyed by ``prefix_key``, a digest of its tokens chained
with the previous block's key, so one key names the whole prefix up to the block's end. Another sequence whose
tokens begin the same way finds the block by that key and shares it (one reference more) instead of computing
it again. A keyed block no sequence holds any more keeps its KV, counted as free, until an allocation needs it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


def prefix_key(prev: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a full block holding ``tokens`` after the prefix keyed ``prev`` (b"" for the first block).

    sha256 rather than Python's 64-bit hash(): a collision would silently hand one prompt another's KV, and
    prompts come from clients who could search for one.
    """
    return hashlib.sha256(prev + array("q", tokens).tobytes()).digest()


class BlockAllocator:
    """Block ids 0 .. num_blocks-1, each free, in use (with a count of the tables holding it), or cached: held by
    no table but keyed, its KV kept for a later sequence with the same prefix.

    Cached blocks count as free (``num_free``): an allocation takes a never-keyed free block first and only then
    evicts the least recently released cached block, which loses its key.

    Freed blocks go to the back of the list, so a block just released is the last one reused: a bug
    that reads a stale block shows up as wrong numbers rather than hiding behind identical contents.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # least recently released first
        self._refs: dict[int, int] = {}  # block in use -> tables holding it
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: the free ones and the cached ones it would evict."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        """Blocks held by no table that still keep a prefix's KV (a part of ``num_free``)."""
        return len(self._cached)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks; raises RuntimeError when fewer are free (callers check ``num_free`` first)."""
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks with only {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._cached.popitem(last=False)
                del self._block_of[self._key_of.pop(b)]
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; a block nobody holds any more is cached if keyed, else free."""
        for b in blocks:
            refs = self._refs.get(b)
            if refs is None:
                raise RuntimeError(f"KV block {b} freed twice or never allocated")
            if refs > 1:
                self._refs[b] = refs - 1
                continue
            del self._refs[b]
            if b in self._key_of:
                self._cached[b] = None
            else:
                self._free.append(b)

    def lookup(self, key: bytes) -> int | None:
        """The block keyed ``key`` (in use or cached), if any."""
        return self._block_of.get(key)

    def share(self, block: int) -> None:
        """Take one more reference to a keyed block (found by ``lookup``), out of the cache if nobody held it."""
        if block not in self._key_of:
            raise RuntimeError(f"KV block {block} holds no prefix's KV: only a keyed block can be shared")
        if block in self._cached:
            del self._cached[block]
            self._refs[block] = 1
        else:
            self._refs[block] += 1

    def register(self, block: int, key: bytes) -> None:
        """``block`` (in use, full) holds the KV of the prefix ``key`` names. A key some other block already has
        (two sequences computed the same prefix side by side) stays with that one; this block stays unkeyed."""
        if block not in self._refs:
            raise RuntimeError(f"KV block {block} is not in use: only a block a table holds can be keyed")
        if key not in self._block_of and block not in self._key_of:
            self._key_of[block] = key
            self._block_of[key] = block


class BlockTable:
    """The blocks of one sequence, in token order."""

    def __init__(self, allocator: BlockAllocator, block_size: int) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.blocks: list[int] = []
        # Leading blocks already given back (drop_before): their entries stay, so positions still index the
        # table, but no kernel reads them and the allocator may have handed them to another sequence.
        self.dropped = 0
        self.keys: list[bytes] = []  # prefix keys of the leading full blocks, as far as reuse/publish got

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

    def reuse(self, token_ids: Sequence[int], limit: int) -> int:
        """Share the cached blocks of the longest run of whole blocks that begins ``token_ids[:limit]`` (into an
        empty table); returns how many tokens they hold. The run ends at the first block whose key is unknown."""
        if self.blocks:
            raise RuntimeError("reuse() fills an empty block table")
        bs = self.block_size
        for i in range(limit // bs):
            key = prefix_key(self.keys[-1] if self.keys else b"", token_ids[i * bs:(i + 1) * bs])
            block = self.allocator.lookup(key)
            if block is None:
                break
            self.allocator.share(block)
            self.blocks.append(block)
            self.keys.append(key)
        return len(self.blocks) * self.block_size

    def publish(self, token_ids: Sequence[int], num_tokens: int) -> None:
        """Key each full block among the first ``num_tokens`` of ``token_ids`` (the caller vouches that their KV is
        written) so that later sequences can reuse it; blocks keyed before are skipped."""
        bs = self.block_size
        for i in range(len(self.keys), min(num_tokens // bs, len(self.blocks))):
            key = prefix_key(self.keys[-1] if self.keys else b"", token_ids[i * bs:(i + 1) * bs])
            self.allocator.register(self.blocks[i], key)
            self.keys.append(key)

    def release(self) -> None:
        # Last block first: of a cached prefix the tail is evicted before its head, since a block is only found
        # through the keys of every block before it.
        self.allocator.free(self.blocks[self.dropped:][::-1])
        self.blocks = []
        self.dropped = 0
        self.keys = []

    def slots(self, start: int, n: int) -> list[int]:
        """Cache slots (block * block_size + offset) of tokens ``start .. start+n-1``."""
        bs = self.block_size
        return [self.blocks[p // bs] * bs + p % bs for p in range(start, start + n)]
