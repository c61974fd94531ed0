"""The backing device: where written-back pages go, 4 KiB blocks in a file.

As zram's ``backing_dev``: a file or block device divided into 4 KiB
blocks; a written-back slot holds the WB flag and, in place of a pool
handle, its block number.  Pages are stored uncompressed, one per block,
so a read is one ``pread``.  Block 0 is never used, so a block number is
never 0 and a WB slot always has a non-zero handle, as in the kernel.

A map of one byte per block (bytes are simpler to search than bits with
``find``) marks the blocks in use; it is an anonymous mapping, so only the
pages of it that blocks in use have touched take memory (a 1 TiB sparse
file would otherwise cost 256 MiB at once, resident for a locked swap
server).  ``_lock`` guards it and the counters.  I/O happens
outside the lock with positional calls, which are safe between threads.

Counters are bd_stat's, in 4 KiB pages: bd_count (blocks in use), bd_reads
and bd_writes (pages moved since the device was created).
"""

import errno
import mmap
import os
import stat
import threading

from . import PAGE_SIZE
from .errors import ConfigError, CorruptDataError, NoSpaceError, ZramdError
from .stats import BdStat


def _check_private_file(path, st):
    if st.st_uid not in (os.geteuid(), 0):
        raise ConfigError("backing_dev: %s: owned by uid %d; accepted: a "
                          "file of uid %d or root" % (path, st.st_uid,
                                                      os.geteuid()))
    if st.st_mode & 0o077:
        raise ConfigError("backing_dev: %s: mode %04o lets others at the "
                          "pages written back there; accepted: mode 0600 "
                          "(chmod 600 %s)"
                          % (path, stat.S_IMODE(st.st_mode), path))


class BackingDev:
    """A file or block device of 4 KiB blocks for written-back pages."""

    def __init__(self, path):
        """Open ``path`` as the kernel opens its backing device: a block
        device exclusively (O_EXCL: not while mounted or in use), never
        through a symbolic link; a regular file only if it is ours (or
        root's) and nobody else may read or write it, since written-back
        pages are stored in the clear.  ConfigError says what is wrong."""
        if "\0" in path:
            raise ConfigError("backing_dev: %r: a path holds no NUL byte"
                              % path)
        if not os.path.isabs(path):
            raise ConfigError("backing_dev: %s: a relative path; accepted: "
                              "an absolute path" % path)
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            if stat.S_ISBLK(os.lstat(path).st_mode):
                flags |= os.O_EXCL
            fd = os.open(path, flags)
        except OSError as e:
            why = ("a symbolic link" if e.errno == errno.ELOOP
                   else e.strerror)
            raise ConfigError("backing_dev: %s: %s; accepted: a writable"
                              " file or block device" % (path, why))
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                size = os.lseek(fd, 0, os.SEEK_END)
            elif stat.S_ISREG(st.st_mode):
                size = st.st_size
                _check_private_file(path, st)
            else:
                raise ConfigError("backing_dev: %s: not a regular file or"
                                  " block device" % path)
            if size < 2 * PAGE_SIZE:
                raise ConfigError("backing_dev: %s: %d bytes; accepted: at"
                                  " least %d" % (path, size, 2 * PAGE_SIZE))
        except BaseException:
            os.close(fd)
            raise
        self.path = path
        self._fd = fd
        self.nr_blocks = size // PAGE_SIZE
        self._used = mmap.mmap(-1, self.nr_blocks)
        self._used[0] = 1                     # block 0: never handed out
        self._next = 1                        # where the search resumes
        self._lock = threading.Lock()
        self.bd_count = 0
        self.bd_reads = 0
        self.bd_writes = 0

    def alloc_block(self):
        """A free block number (>= 1); NoSpaceError when the device is
        full."""
        with self._lock:
            blk = self._used.find(b"\0", self._next)
            if blk < 0:
                blk = self._used.find(b"\0", 1)
            if blk < 0:
                raise NoSpaceError("writeback: %s: no free block" % self.path)
            self._used[blk] = 1
            self._next = blk + 1
            self.bd_count += 1
            return blk

    def free_block(self, blk):
        with self._lock:
            if self._used[blk]:
                self._used[blk] = 0
                self.bd_count -= 1

    def write_page(self, blk, page):
        try:
            n = os.pwrite(self._fd, page, blk * PAGE_SIZE)
        except OSError as e:
            raise ZramdError("writeback: %s: block %d: %s"
                             % (self.path, blk, e.strerror)) from None
        if n != PAGE_SIZE:
            raise NoSpaceError("writeback: %s: block %d: short write"
                               % (self.path, blk))
        with self._lock:
            self.bd_writes += 1

    def read_page(self, blk, slot):
        try:
            data = os.pread(self._fd, PAGE_SIZE, blk * PAGE_SIZE)
        except OSError as e:
            raise CorruptDataError("backing_dev read: slot %d: block %d: %s"
                                   % (slot, blk, e.strerror)) from None
        if len(data) != PAGE_SIZE:
            raise CorruptDataError("backing_dev read: slot %d: block %d:"
                                   " short read" % (slot, blk))
        with self._lock:
            self.bd_reads += 1
        return data

    def fileno(self):
        """The descriptor pages are read from (the slot table's C reads
        use it too: see Device._use_backing)."""
        return self._fd

    def stat(self):
        return BdStat(bd_count=self.bd_count, bd_reads=self.bd_reads,
                      bd_writes=self.bd_writes)

    def close(self):
        os.close(self._fd)
        self._used.close()
