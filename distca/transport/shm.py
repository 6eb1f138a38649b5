"""Same-host shared memory for the data plane: task rows move through named POSIX segments in
``/dev/shm``; ZeroMQ carries only the headers that name them.

The trainer owns the memory; a server only maps what a header names, after checking it::

    trainer (SegmentSlots)                          attention server (SegmentCache)
    create "distca-<pid>-<tag>-<server>-<n>",
      fully allocated, grow-only, one per round
      in flight; gather rows into its regions
    header: name, input regions, reply regions ──►  open by name, check, map, close the fd, unlink
                                                    the name; copy the rows into its receive buffers,
                                                    compute, write the results into the reply regions
    ◄─────────────────────────── header-only reply  (the server holds its own mapping now)
    unlink the name (if the server has not): both mappings stay valid and nothing is left in
    /dev/shm; later rounds reuse the segment; a retired one is named in the next header
    (``shm_drop``) so the server unmaps it

Both sides unlink, so a name is gone as soon as the server has mapped the segment, even if the trainer
dies right after; only a trainer killed between creating a segment and its server mapping it leaves a
name behind (until reboot or ``rm /dev/shm/distca-*``; a normal exit or an exception removes it).

Everything a server takes from a header is checked before a byte is touched: the name has the prefix
and no path; the file is a regular file of this user, no larger than the configured bound, and fully
allocated (a sparse segment on a full tmpfs would fault on the first write); every region lies inside
it, aligned for its dtype. A server maps at most ``max_segments`` segments; the least recently used one
is unmapped first. Violations are :class:`ShmError` (a :class:`~distca.transport.wire.WireError`), which a
server answers with an ERROR. Processes of the same user are trusted not to truncate a segment by name
in the moment between its creation and its unlinking (they could as well kill the server).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import socket
import stat
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from distca.transport.wire import WireError

log = logging.getLogger(__name__)

PREFIX = "distca-"
SHM_DIR = Path("/dev/shm")
ALIGN = 64  # every region starts on a cache line (and so is aligned for any dtype)
GROW = 1 << 20  # segment sizes are rounded up to this, with headroom, so rounds of varying size reuse them
MAX_DROP = 64  # names a header may ask a server to unmap
_NAME = re.compile(re.escape(PREFIX) + r"[A-Za-z0-9_.-]{1,128}")


class ShmError(WireError):
    """A shared-memory segment or region that cannot be used as named (or cannot be created)."""


def host_identity() -> str:
    """Which shared memory this process sees: hostname, kernel boot id and the ``/dev/shm`` mount, or ``""``
    without one. Processes with equal identities exchange rows through ``/dev/shm``; containers on one host
    that each mount their own ``/dev/shm`` differ in the mount and fall back to ZeroMQ."""
    try:
        st = os.stat(SHM_DIR)
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
    if not stat.S_ISDIR(st.st_mode):
        return ""
    return f"{socket.gethostname()}/{boot}/{st.st_dev}:{st.st_ino}"


def check_name(name: object) -> str:
    """``name`` if it is a DistCA segment name (the prefix, then letters, digits, ``._-``), else ShmError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ShmError(f"segment name {str(name)[:80]!r} is not a DistCA segment name ({PREFIX}... of letters, "
                       f"digits and '._-')")
    return name


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to the region alignment."""
    return -(-nbytes // ALIGN) * ALIGN


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class Segment:
    """One mapped segment of ``size`` bytes, viewed as tensors at checked offsets."""

    def __init__(self, name: str, mm: mmap.mmap, size: int, *, owned: bool):
        self.name, self.size = name, size
        self._mm = mm
        # Through numpy, so every view holds the mapping's buffer export: close() cannot unmap pages that a
        # live tensor still points at (torch.frombuffer would not hold it).
        self._data: torch.Tensor | None = torch.from_numpy(np.frombuffer(mm, dtype=np.uint8))
        # The creator removes the name at the latest when the segment is collected or the process exits.
        self._unlinker = weakref.finalize(self, _unlink, SHM_DIR / name) if owned else None

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        """A new segment of ``size`` bytes, every page allocated now (a full tmpfs fails here, as a
        ShmError, instead of faulting on a later write)."""
        check_name(name)
        if size < 1:
            raise ShmError(f"segment {name}: size must be >= 1 byte, got {size}")
        path = SHM_DIR / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ShmError(f"segment {name}: cannot create it in {SHM_DIR} ({exc.strerror})") from None
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size)
        except OSError as exc:
            _unlink(path)
            raise ShmError(f"segment {name}: cannot allocate {size} bytes in {SHM_DIR} ({exc.strerror})") from None
        finally:
            os.close(fd)
        return cls(name, mm, size, owned=True)

    @classmethod
    def attach(cls, name: object, max_bytes: int) -> Segment:
        """Map the segment a peer named, after checking it (see the module docstring)."""
        name = check_name(name)
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise ShmError(f"segment {name}: cannot open it ({exc.strerror}); is the trainer on this host, "
                           f"sharing {SHM_DIR}?") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ShmError(f"segment {name}: not a regular file")
            if st.st_uid != os.getuid():
                raise ShmError(f"segment {name}: owned by uid {st.st_uid}, this server runs as {os.getuid()}")
            if not 0 < st.st_size <= max_bytes:
                raise ShmError(f"segment {name}: {st.st_size} bytes, outside (0, {max_bytes}] (the server's "
                               f"transport.shm_max_mb)")
            if st.st_blocks * 512 < st.st_size:
                raise ShmError(f"segment {name}: not fully allocated ({st.st_blocks * 512} of {st.st_size} bytes)")
            mm = mmap.mmap(fd, st.st_size)
        except OSError as exc:
            raise ShmError(f"segment {name}: cannot map it ({exc.strerror})") from None
        finally:
            os.close(fd)
        return cls(name, mm, st.st_size, owned=False)

    def view(self, offset: object, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The ``dtype`` tensor of ``shape`` at byte ``offset``; a region outside the segment or misaligned
        for its dtype is a ShmError."""
        if self._data is None:
            raise ShmError(f"segment {self.name} is closed")
        itemsize = dtype.itemsize
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * itemsize
        if type(offset) is not int or offset < 0 or offset % itemsize:
            raise ShmError(f"segment {self.name}: offset {str(offset)[:40]} is not a non-negative multiple of "
                           f"{itemsize} ({dtype})")
        if offset + nbytes > self.size:
            raise ShmError(f"segment {self.name}: region [{offset}, {offset + nbytes}) lies outside its "
                           f"{self.size} bytes")
        return self._data[offset:offset + nbytes].view(dtype).view(shape)

    def unlink(self) -> None:
        """Remove the name (the creator, once the server has mapped it): mappings stay valid."""
        if self._unlinker is not None:
            self._unlinker()

    @property
    def linked(self) -> bool:
        """Whether this process still has to remove the name (creator only)."""
        return self._unlinker is not None and self._unlinker.alive

    def close(self) -> None:
        """Unmap; pages that a live view still points at stay mapped until the view is gone."""
        self._data = None
        with contextlib.suppress(BufferError):
            self._mm.close()


class SegmentSlots:
    """A trainer's segments for one server, one per round in flight: :meth:`acquire` a segment of at
    least ``nbytes`` (a free one that fits, else a new one that replaces a free one too small),
    :meth:`release` it after the round, :meth:`retire` it when the round failed. Retired names are
    collected for the server to unmap (:meth:`take_dropped`)."""

    def __init__(self, stem: str, max_bytes: int):
        self.stem, self.max_bytes = stem, max_bytes
        self.free: list[Segment] = []
        self.busy: dict[str, Segment] = {}
        self.created = 0
        self.dropped: list[str] = []

    def acquire(self, nbytes: int) -> Segment:
        """A segment of >= ``nbytes`` for one round; ShmError when over the bound or /dev/shm is full."""
        if nbytes > self.max_bytes:
            raise ShmError(f"a round needs {nbytes} bytes, over the {self.max_bytes}-byte segment bound")
        fits = [s for s in self.free if s.size >= nbytes]
        if fits:
            seg = min(fits, key=lambda s: s.size)
            self.free.remove(seg)
        else:
            if self.free:  # grow: the largest free one is too small, replace it
                self.retire(max(self.free, key=lambda s: s.size))
            size = min(self.max_bytes, -(-(nbytes + nbytes // 4) // GROW) * GROW)
            seg = Segment.create(f"{self.stem}-{self.created}", size)
            self.created += 1
        self.busy[seg.name] = seg
        return seg

    def release(self, seg: Segment) -> None:
        """The round is over: the segment serves a later one."""
        if self.busy.pop(seg.name, None) is not None:
            self.free.append(seg)

    def retire(self, seg: Segment) -> None:
        """Never use ``seg`` again (its round failed, or it is too small): unlink and unmap it here, and
        name it to the server in the next header."""
        self.busy.pop(seg.name, None)
        if seg in self.free:
            self.free.remove(seg)
        seg.unlink()
        seg.close()
        self.dropped = [*self.dropped, seg.name][-MAX_DROP:]

    def take_dropped(self) -> list[str]:
        """Names retired since the last call (for the next header's ``shm_drop``)."""
        names, self.dropped = self.dropped, []
        return names

    def close(self) -> list[str]:
        """Retire every segment; returns the names the server may still map."""
        for seg in [*self.free, *self.busy.values()]:
            self.retire(seg)
        return self.take_dropped()

    def nbytes(self) -> int:
        return sum(s.size for s in (*self.free, *self.busy.values()))


class SegmentCache:
    """A server's mappings of the trainers' segments, by name: at most ``max_segments``, the least recently
    used unmapped first; none at all when ``max_bytes`` is 0 (shared memory off). A segment's name is
    removed as soon as it is mapped (its trainer removes it too, whichever comes first)."""

    def __init__(self, max_bytes: int, max_segments: int):
        self.max_bytes, self.max_segments = max_bytes, max_segments
        self.open: OrderedDict[str, Segment] = OrderedDict()

    def get(self, name: object) -> Segment:
        """The mapped segment ``name`` (mapped now, after the checks, if it is not yet)."""
        if self.max_bytes <= 0:
            raise ShmError("this server takes no shared memory (transport.shm_max_mb is 0)")
        seg = self.open.pop(name, None) if isinstance(name, str) else None
        if seg is None:
            seg = Segment.attach(name, self.max_bytes)
            _unlink(SHM_DIR / seg.name)
            while len(self.open) >= self.max_segments:
                _, old = self.open.popitem(last=False)
                log.info("unmapping least recently used segment %s (%d mapped)", old.name, self.max_segments)
                old.close()
        self.open[seg.name] = seg
        return seg

    def drop(self, names: list[str]) -> None:
        """Unmap the named segments (their trainer retired them)."""
        for name in names:
            seg = self.open.pop(name, None)
            if seg is not None:
                seg.close()

    def close(self) -> None:
        self.drop(list(self.open))

    def nbytes(self) -> int:
        return sum(s.size for s in self.open.values())
