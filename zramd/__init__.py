"""zramd: a userspace clone of Linux zram served over NBD by nbdkit.

Layers, bottom up: ``arena`` (4 KiB page frames from mmap), ``zsmalloc``
(the size-class pool that hands out opaque handles), ``compress`` (the
backend registry), ``device`` (zram's slot table and I/O paths), ``stats``
(the kernel's stat lines), and the edges: ``plugin.py`` at the repo root,
``control`` and ``cli``.
"""

__version__ = "0.1.0"

PAGE_SIZE = 4096
PAGE_SHIFT = 12
