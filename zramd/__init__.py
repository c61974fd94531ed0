"""zramd: a userspace clone of Linux zram served over NBD by nbdkit.

Layers, bottom up: ``zsmalloc`` (the size-class pool that hands out
opaque handles, over its own 4 KiB frames, with its deferred free; C in
``csrc/zsmalloc.c``, stats shapes in Python), ``compress`` (the
backend registry), ``device`` (zram's slot table and I/O paths), ``stats``
(the kernel's stat lines), and the edges: ``plugin.py`` at the repo root,
``control`` and ``cli``.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # PAGE_SIZE and PAGE_SHIFT are zramd/csrc/zram_defs.h's, taken from the
    # extension on first use: importing zramd alone (zramd.config, for the
    # systemd generator) must not need the C part.
    if name in ("PAGE_SIZE", "PAGE_SHIFT"):
        from . import _fastpath
        return getattr(_fastpath, name)
    raise AttributeError("module 'zramd' has no attribute %r" % (name,))
