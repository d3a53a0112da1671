"""The host-side pieces of the torch-free GPU path, on the CPU: where weights go in device memory and which
copies carry them, the device-to-device copies that apply a feed, and DeviceArray's views.

Each is checked against a plain per-element simulation written here (a byte array standing in for the device)."""

import numpy as np
import pytest

from runtime.memory import DeviceArray
from runtime.program import feed_runs
from runtime.weights_upload import placement


def _ranges(sizes: list[int], gap: int = 0) -> dict:
    """name -> (dtype, shape, begin, end) of u8 tensors laid end to end (``gap`` bytes between them), as a
    safetensors writer lays out a file: offsets need not be aligned."""
    out, off = {}, 0
    for i, n in enumerate(sizes):
        out[f"t{i}"] = ("u8", (n,), off, off + n)
        off += n + gap
    return out


@pytest.mark.parametrize("sizes,gap", [([64, 32, 16], 0), ([7, 5, 33, 1, 16], 0), ([3, 13], 3), ([1], 0), ([], 0)])
def test_weight_placement_is_aligned_and_its_segment_copies_land_every_tensor(sizes, gap):
    ranges = _ranges(sizes, gap)
    offsets, total, segments = placement(ranges)
    rng = np.random.default_rng(len(sizes))
    file = rng.integers(0, 256, sum(sizes) + gap * len(sizes) + 1, dtype=np.uint8)
    device = np.full(max(total, 1), 0xEE, dtype=np.uint8)
    for begin, end, dev in segments:  # what upload_weights copies, chunk size aside
        device[dev:dev + end - begin] = file[begin:end]
    spans = []
    for name, (_, _, begin, end) in ranges.items():
        assert offsets[name] % 16 == 0, name
        assert np.array_equal(device[offsets[name]:offsets[name] + end - begin], file[begin:end]), name
        spans.append((offsets[name], offsets[name] + end - begin))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "tensors overlap on the device"
    assert total == (max(e for _, e in spans) if spans else 0)


def test_aligned_tensors_are_one_copy():
    _, _, segments = placement(_ranges([64, 32, 16, 48]))
    assert segments == [(0, 160, 0)]


@pytest.mark.parametrize("feed", [[0, 1, 2, 3], [2, -1, 0], [-1, -1], [3, 2, 1, 0], [0, 1, -1, 3, 4], [1, 2, 0]])
def test_feed_runs_apply_the_feed_row_by_row(feed):
    pool = np.arange(100, 108, dtype=np.int32)  # the last sampled ids
    ids = np.arange(-1, -1 - len(feed), -1, dtype=np.int32)  # the host's ids (placeholders)
    want = np.array([pool[f] if f >= 0 else ids[i] for i, f in enumerate(feed)], dtype=np.int32)
    got = ids.copy()
    runs = feed_runs(np.array(feed, dtype=np.int32))
    for row, src, count in runs:  # one device-to-device copy each
        got[row:row + count] = pool[src:src + count]
    assert np.array_equal(got, want)
    assert len(runs) <= sum(f >= 0 for f in feed)
    if feed == [0, 1, 2, 3]:
        assert runs == [(0, 0, 4)]  # a batch that kept its order: one copy


def test_device_array_rows_and_bytes():
    a = DeviceArray(0x1000, (4, 3), "fp32")
    assert a.nbytes == 48 and a.numel == 12 and len(a) == 4 and a.data_ptr() == 0x1000
    b = a[1:3]
    assert (b.ptr, b.shape, b.dtype) == (0x1000 + 12, (2, 3), "fp32")
    assert a[:10].shape == (4, 3) and a[3:1].shape == (0, 3)
    with pytest.raises(TypeError):
        a[::2]
