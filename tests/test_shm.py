"""The shared-memory segment helper (distca.transport.shm) on its own: creation, checked attachment, bounded
views, grow-only reuse on the trainer's side, the server's bounded cache, and nothing left in /dev/shm."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

from distca.transport.shm import (
    PREFIX,
    SHM_DIR,
    Segment,
    SegmentCache,
    SegmentSlots,
    ShmError,
    check_name,
    host_identity,
)
from distca.transport.wire import WireError

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="needs /dev/shm")


@pytest.fixture()
def stem():
    """A unique name stem; the test fails if any segment of it is left behind."""
    s = f"{PREFIX}test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield s
    left = [p.name for p in SHM_DIR.glob(f"{s}*")]
    for name in left:
        os.unlink(SHM_DIR / name)
    assert not left, f"segments left in {SHM_DIR}: {left}"


def test_create_attach_share_bytes_and_unlink_keeps_both_mappings(stem):
    a = Segment.create(f"{stem}-a", 4096)
    b = Segment.attach(a.name, max_bytes=1 << 20)
    assert b.size == a.size == 4096
    a.unlink()  # the name goes, both mappings stay valid
    assert not (SHM_DIR / a.name).exists() and not a.linked
    x = a.view(64, torch.float32, (4, 2))
    x.copy_(torch.arange(8.0).view(4, 2))
    assert torch.equal(b.view(64, torch.float32, (4, 2)), torch.arange(8.0).view(4, 2))
    b.view(0, torch.float64, (2,)).fill_(7.0)
    assert a.view(0, torch.float64, (2,)).tolist() == [7.0, 7.0]
    a.close()
    b.close()


def test_views_outside_the_segment_or_misaligned_are_refused(stem):
    seg = Segment.create(f"{stem}-v", 1024)
    try:
        assert seg.view(1024 - 16, torch.float32, (4,)).numel() == 4  # the last bytes exactly
        for offset, shape, what in [(1024 - 12, (4,), "outside"), (2 << 40, (1,), "outside"), (-4, (1,), "offset"),
                                    (2, (1,), "offset"), (0, (300,), "outside"), ("0", (1,), "offset")]:
            with pytest.raises(ShmError, match=what):
                seg.view(offset, torch.float32, shape)
    finally:
        seg.unlink()
        seg.close()
    with pytest.raises(ShmError, match="closed"):
        seg.view(0, torch.float32, (1,))


def test_a_closed_segment_stays_mapped_while_a_view_lives(stem):
    seg = Segment.create(f"{stem}-c", 4096)
    seg.unlink()
    v = seg.view(0, torch.float32, (16,))
    seg.close()  # the mapping cannot go while v points into it
    v.fill_(3.0)
    assert float(v.sum()) == 48.0


def test_attach_checks_name_size_kind_and_allocation(stem, tmp_path):
    for bad in ("x", "distca-", "distca-a/b", "../etc/passwd", f"{PREFIX}{'a' * 200}", 7, None):
        with pytest.raises(ShmError, match="not a DistCA segment name"):
            Segment.attach(bad, 1 << 20)
    with pytest.raises(ShmError, match="cannot open"):
        Segment.attach(f"{stem}-missing", 1 << 20)
    big = Segment.create(f"{stem}-big", 2 << 20)
    with pytest.raises(ShmError, match=r"outside \(0, 1048576\]"):
        Segment.attach(big.name, 1 << 20)
    big.unlink()
    big.close()
    sparse = SHM_DIR / f"{stem}-sparse"  # a file that was never allocated: writing to it could fault
    fd = os.open(sparse, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 8192)
    os.close(fd)
    with pytest.raises(ShmError, match="not fully allocated"):
        Segment.attach(sparse.name, 1 << 20)
    os.unlink(sparse)
    os.mkdir(SHM_DIR / f"{stem}-dir")
    try:
        with pytest.raises(ShmError, match="cannot open"):  # O_RDWR on a directory
            Segment.attach(f"{stem}-dir", 1 << 20)
    finally:
        os.rmdir(SHM_DIR / f"{stem}-dir")
    target = tmp_path / "target"
    target.write_bytes(b"\0" * 4096)
    os.symlink(target, SHM_DIR / f"{stem}-link")
    try:
        with pytest.raises(ShmError, match="cannot open"):  # never followed out of /dev/shm
            Segment.attach(f"{stem}-link", 1 << 20)
    finally:
        os.unlink(SHM_DIR / f"{stem}-link")
    assert issubclass(ShmError, WireError)  # a server answers it like any malformed message


def test_slots_reuse_grow_and_retire(stem):
    slots = SegmentSlots(stem, max_bytes=8 << 20)
    a = slots.acquire(1000)
    b = slots.acquire(1000)  # a second round in flight gets its own segment
    assert a is not b and a.size >= 1000
    slots.release(a)
    assert slots.acquire(500) is a  # reused, not recreated
    slots.release(a)
    slots.release(b)
    c = slots.acquire(3 << 20)  # more than any free one holds: a bigger one replaces a free one
    assert c.size >= 3 << 20 and c.size <= 8 << 20
    assert len(slots.take_dropped()) == 1 and slots.take_dropped() == []
    with pytest.raises(ShmError, match="over the"):
        slots.acquire(9 << 20)
    slots.retire(c)
    assert slots.take_dropped() == [c.name] and not (SHM_DIR / c.name).exists()
    names = slots.close()
    assert len(names) == 1 and slots.nbytes() == 0


def test_cache_maps_at_most_max_segments_least_recently_used_first(stem):
    segs = [Segment.create(f"{stem}-{i}", 4096) for i in range(3)]
    cache = SegmentCache(max_bytes=1 << 20, max_segments=2)
    try:
        cache.get(segs[0].name)
        cache.get(segs[1].name)
        cache.get(segs[0].name)  # 0 is now the most recently used
        cache.get(segs[2].name)
        assert list(cache.open) == [segs[0].name, segs[2].name] and cache.nbytes() == 8192
        cache.drop([segs[2].name, "distca-unknown"])
        assert list(cache.open) == [segs[0].name]
        with pytest.raises(ShmError, match="no shared memory"):
            SegmentCache(max_bytes=0, max_segments=2).get(segs[0].name)
    finally:
        cache.close()
        for s in segs:
            s.unlink()
            s.close()


def test_an_unreleased_segment_is_unlinked_when_collected(stem):
    seg = Segment.create(f"{stem}-gc", 4096)
    path = SHM_DIR / seg.name
    assert path.exists()
    del seg
    assert not path.exists()


def test_names_and_host_identity():
    assert check_name("distca-123-abc-0-1") == "distca-123-abc-0-1"
    ident = host_identity()
    assert ident and ident == host_identity() and os.uname().nodename in ident


def test_the_server_side_removes_a_name_once_mapped(stem):
    seg = Segment.create(f"{stem}-s", 4096)
    cache = SegmentCache(max_bytes=1 << 20, max_segments=2)
    try:
        mapped = cache.get(seg.name)
        assert not (SHM_DIR / seg.name).exists()  # a trainer killed now leaves nothing behind
        seg.view(0, torch.int64, (1,)).fill_(42)
        assert int(mapped.view(0, torch.int64, (1,))) == 42
        assert cache.get(seg.name) is mapped  # mapped by name, not reopened
        seg.unlink()  # the trainer's own unlink after the answer finds nothing to do
    finally:
        cache.close()
        seg.close()
