import pytest

from runtime.kv_cache import BlockAllocator, BlockTable, blocks_for


def test_blocks_for():
    assert [blocks_for(n, 16) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]
    assert blocks_for(5, 1) == 5


def test_allocate_and_free():
    a = BlockAllocator(7)
    x = a.allocate(3)
    y = a.allocate(4)
    assert len(set(x) | set(y)) == 7 and set(x) | set(y) == set(range(7))
    assert a.num_free == 0 and a.num_used == 7
    with pytest.raises(RuntimeError, match="only 0 free"):
        a.allocate(1)
    a.free(x)
    assert a.num_free == 3 and a.num_used == 4
    z = a.allocate(2)
    assert set(z) <= set(x)


def test_double_free_and_foreign_free_raise():
    a = BlockAllocator(4)
    x = a.allocate(2)
    a.free(x)
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free(x[:1])
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free([99])


def test_freed_blocks_are_reused_last():
    a = BlockAllocator(4)
    first = a.allocate(1)
    a.free(first)
    assert a.allocate(3) == [1, 2, 3]
    assert a.allocate(1) == first


def test_allocator_needs_a_block():
    with pytest.raises(ValueError, match="at least one block"):
        BlockAllocator(0)


def test_block_table_grows_all_or_nothing():
    a = BlockAllocator(5)
    t = BlockTable(a, block_size=4)
    assert t.ensure(9) and len(t.blocks) == 3 and t.capacity == 12
    assert t.ensure(12) and len(t.blocks) == 3  # still fits
    other = BlockTable(a, block_size=4)
    assert not other.ensure(13)  # needs 4, only 2 free: takes nothing
    assert other.blocks == [] and a.num_free == 2
    assert t.missing(13) == 1 and t.ensure(13) and a.num_free == 1
    t.release()
    assert t.blocks == [] and a.num_free == 5


def test_slots_follow_the_block_table():
    a = BlockAllocator(6)
    a.allocate(2)  # make the table's blocks non-contiguous with positions
    t = BlockTable(a, block_size=3)
    t.ensure(7)
    b0, b1, b2 = t.blocks
    assert t.slots(0, 7) == [b0 * 3, b0 * 3 + 1, b0 * 3 + 2, b1 * 3, b1 * 3 + 1, b1 * 3 + 2, b2 * 3]
    assert t.slots(4, 2) == [b1 * 3 + 1, b1 * 3 + 2]


def test_drop_before_gives_back_leading_blocks_once():
    alloc = BlockAllocator(6)
    table = BlockTable(alloc, 4)
    assert table.ensure(14) and alloc.num_used == 4
    assert table.drop_before(3) == 0  # block 0 still holds position 3
    assert table.drop_before(9) == 2 and alloc.num_used == 2
    assert table.drop_before(5) == 0 and table.drop_before(9) == 0  # already gone: never freed twice
    assert len(table.blocks) == 4 and table.slots(9, 2) == [table.blocks[2] * 4 + 1, table.blocks[2] * 4 + 2]
    table.release()
    assert alloc.num_free == 6 and table.dropped == 0
