"""Build of zramd's C extensions (everything else is in pyproject.toml).

zramd._fastpath links the system's liblz4, libzstd and zlib (Debian:
liblz4-dev, libzstd-dev, python3-dev; scripts/common.sh installs them;
zlib1g-dev comes with python3-dev, through libpython3.11-dev).
zramd._threadstate (zramd.threadstate's thread-exit hook) needs only
Python.h.  zramd._nbdkit_filter is not a Python module but the nbdkit
filter zramd's servers run in front of plugin.py (zramd/filter/): it
needs nbdkit-filter.h (Debian: nbdkit-plugin-dev, of the same version as
nbdkit, which loads only a filter built against its own version).  No
timestamp says which nbdkit a filter was built against, so every build
compiles it again (one small file): after an upgrade of nbdkit,
``pip install -e .`` gives a filter the new one loads.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

FILTER = "zramd._nbdkit_filter"


class BuildExt(build_ext):
    def build_extension(self, ext):
        if ext.name != FILTER:
            return super().build_extension(ext)
        force, self.force = self.force, True
        try:
            return super().build_extension(ext)
        finally:
            self.force = force


setup(cmdclass={"build_ext": BuildExt}, ext_modules=[Extension(
    "zramd._fastpath", ["zramd/_fastpath.c", "zramd/glue/py_codec.c",
                        "zramd/glue/py_zspool.c", "zramd/glue/py_zram.c",
                        "zramd/csrc/zsmalloc.c",
                        "zramd/csrc/zram.c", "zramd/csrc/zcomp.c",
                        "zramd/csrc/backend_lz4.c",
                        "zramd/csrc/backend_lz4hc.c",
                        "zramd/csrc/backend_zstd.c",
                        "zramd/csrc/backend_deflate.c",
                        "zramd/csrc/crew.c"],
    depends=["zramd/glue/glue.h", "zramd/filter/offer.h",
             "zramd/csrc/zram_defs.h", "zramd/csrc/zsmalloc.h",
             "zramd/csrc/zram.h", "zramd/csrc/zcomp.h",
             "zramd/csrc/zcomp_backend.h", "zramd/csrc/crew.h"],
    libraries=["lz4", "zstd", "z"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Wno-missing-field-initializers",
                        "-Wno-cast-function-type"]),
    # zramd.threadstate's thread-exit hook (kept apart from _fastpath).
    Extension("zramd._threadstate", ["zramd/_threadstate.c"],
              extra_compile_args=["-O2", "-Wall", "-Wextra",
                                  "-Wno-missing-field-initializers"]),
    # Optional: without nbdkit-filter.h zramd still builds, and serves
    # through the plugin alone (zramd.attach.server_filter says why).
    Extension(FILTER, ["zramd/filter/nbdkit_filter.c"],
              optional=True,
              depends=["zramd/filter/offer.h", "zramd/csrc/zram_defs.h"],
              extra_compile_args=["-O2", "-Wall", "-Wextra",
                                  "-fvisibility=hidden",
                                  "-Wno-unused-parameter"])])
