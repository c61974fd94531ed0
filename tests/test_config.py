"""zramd.conf parsing: precedence, drop-ins, the zram-size evaluator, errors."""

import os

import pytest

from zramd import config
from zramd.config import ConfigError, DeviceConfig

MiB = 1 << 20


def write(root, rel, text):
    path = os.path.join(str(root), rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


@pytest.fixture
def root(tmp_path):
    # 8 GiB of "RAM": MemTotal in kB, as in /proc/meminfo.
    write(tmp_path, "proc/meminfo",
          "MemTotal:        8388608 kB\nMemFree:          100000 kB\n")
    return tmp_path


def test_no_files_no_devices(root):
    assert config.load(root) == {}


def test_defaults(root):
    write(root, "etc/zramd/zramd.conf", "[zramd0]\n")
    devs = config.load(root)
    assert list(devs) == ["zramd0"]
    d = devs["zramd0"]
    # min(ram / 2, 4096) with ram = 8192 MiB
    assert d.size == 4096 * MiB
    assert d.algorithm == "lz4" and d.level is None and d.dict_path is None
    assert d.swap_priority == 100
    assert d.fs_type == "swap" and d.is_swap and d.mount_point is None
    assert d.options == "discard"
    assert d.mem_limit == 0
    assert d.sources == (os.path.join(str(root), "etc/zramd/zramd.conf"),)


def test_meminfo_drives_default_size(root):
    write(root, "proc/meminfo", "MemTotal:        2097152 kB\n")   # 2 GiB
    write(root, "etc/zramd/zramd.conf", "[zramd0]\n")
    assert config.load(root)["zramd0"].size == 1024 * MiB


def test_all_keys(root):
    write(root, "etc/zramd/zramd.conf", """\
# a comment
; another comment
[zramd0]
zram-size = ram / 4
compression-algorithm = zstd(level=3)
swap-priority = 5
options = discard=pages
mem-limit = 512M

[scratch]
zram-size=256
compression-algorithm=deflate
fs-type=ext4
mount-point=/var/scratch/
options=discard,noatime
""")
    devs = config.load(root)
    assert list(devs) == ["zramd0", "scratch"]
    z, s = devs["zramd0"], devs["scratch"]
    assert (z.size, z.algorithm, z.level, z.swap_priority, z.options,
            z.mem_limit) == (2048 * MiB, "zstd", 3, 5, "discard=pages",
                             512 * MiB)
    assert z.plugin_params() == ["size=%d" % (2048 * MiB), "algorithm=zstd",
                                 "level=3", "mem_limit=%d" % (512 * MiB)]
    assert (s.size, s.algorithm, s.fs_type, s.mount_point, s.options) == (
        256 * MiB, "deflate", "ext4", "/var/scratch", "discard,noatime")
    assert not s.is_swap
    assert s.plugin_params() == ["size=%d" % (256 * MiB), "algorithm=deflate"]


def test_mount_point_alone_means_ext2(root):
    write(root, "etc/zramd/zramd.conf", "[d]\nmount-point=/mnt/x\n")
    d = config.load(root)["d"]
    assert (d.fs_type, d.mount_point) == ("ext2", "/mnt/x")


def test_size_zero_leaves_device_out(root):
    write(root, "etc/zramd/zramd.conf",
          "[a]\nzram-size = 0\n[b]\nzram-size = max(ram - 100000, 0)\n[c]\n")
    assert list(config.load(root)) == ["c"]


def test_size_rounds_down_to_pages(root):
    write(root, "etc/zramd/zramd.conf", "[a]\nzram-size = 1.00001\n")
    assert config.load(root)["a"].size == MiB


# --- precedence -------------------------------------------------------------

def test_main_file_highest_directory_replaces_lower(root):
    write(root, "usr/lib/zramd/zramd.conf",
          "[vendor]\nzram-size=100\n[zramd0]\nswap-priority=1\n")
    write(root, "etc/zramd/zramd.conf", "[zramd0]\nzram-size=200\n")
    devs = config.load(root)
    # /etc's file replaces /usr/lib's whole: no [vendor], priority default
    assert list(devs) == ["zramd0"]
    assert devs["zramd0"].size == 200 * MiB
    assert devs["zramd0"].swap_priority == 100
    write(root, "run/zramd/zramd.conf", "[zramd0]\nzram-size=300\n")
    assert config.load(root)["zramd0"].size == 300 * MiB
    write(root, "usr/local/lib/zramd/zramd.conf", "[zramd0]\nzram-size=1\n")
    assert config.load(root)["zramd0"].size == 300 * MiB


def test_dropins_override_main_and_sort_by_name(root):
    write(root, "usr/lib/zramd/zramd.conf",
          "[zramd0]\nzram-size=100\nswap-priority=10\n")
    write(root, "etc/zramd/zramd.conf.d/20-size.conf",
          "[zramd0]\nzram-size=200\n")
    write(root, "usr/lib/zramd/zramd.conf.d/30-size.conf",
          "[zramd0]\nzram-size=300\n")
    write(root, "run/zramd/zramd.conf.d/10-prio.conf",
          "[zramd0]\nswap-priority=7\nzram-size=50\n")
    d = config.load(root)["zramd0"]
    # file name order, whatever the directory: 10 < 20 < 30
    assert d.size == 300 * MiB
    assert d.swap_priority == 7
    assert [os.path.basename(p) for p in config.config_files(root)] == [
        "zramd.conf", "10-prio.conf", "20-size.conf", "30-size.conf"]


def test_dropin_in_higher_directory_hides_same_name(root):
    write(root, "usr/lib/zramd/zramd.conf.d/50-x.conf",
          "[zramd0]\nzram-size=100\nswap-priority=3\n")
    write(root, "etc/zramd/zramd.conf.d/50-x.conf", "[zramd0]\nzram-size=200\n")
    d = config.load(root)["zramd0"]
    assert d.size == 200 * MiB
    assert d.swap_priority == 100       # the /usr/lib file was not read


def test_dropin_masked_by_dev_null_or_empty(root):
    write(root, "usr/lib/zramd/zramd.conf.d/50-vendor.conf",
          "[vendor]\nzram-size=100\n")
    write(root, "usr/lib/zramd/zramd.conf.d/60-other.conf",
          "[other]\nzram-size=100\n")
    assert sorted(config.load(root)) == ["other", "vendor"]
    os.makedirs(os.path.join(root, "etc/zramd/zramd.conf.d"))
    os.symlink("/dev/null", os.path.join(root, "etc/zramd/zramd.conf.d/50-vendor.conf"))
    write(root, "run/zramd/zramd.conf.d/60-other.conf", "")
    assert config.load(root) == {}


def test_dropin_ignores_other_suffixes(root):
    write(root, "etc/zramd/zramd.conf.d/10-a.conf.bak", "[bak]\n")
    write(root, "etc/zramd/zramd.conf.d/10-a.conf", "[a]\nzram-size=1\n")
    assert list(config.load(root)) == ["a"]


def test_empty_value_resets_to_default(root):
    write(root, "etc/zramd/zramd.conf",
          "[d]\nfs-type=ext4\nmount-point=/mnt\noptions=noatime\n")
    write(root, "etc/zramd/zramd.conf.d/10.conf",
          "[d]\nfs-type=\nmount-point=\noptions=\n")
    d = config.load(root)["d"]
    # options = is zram-generator's "no options" (how discard is turned
    # off), not a reset to the default.
    assert (d.fs_type, d.mount_point, d.options) == ("swap", None, "")


def test_zram_generator_keys(root):
    # MemTotal 8388608 kB = 8192 MiB (the root fixture).
    write(root, "etc/zramd/zramd.conf", """\
[small-only]
host-memory-limit = 4096
[fits]
host-memory-limit = 8192
zram-resident-limit = ram / 8
writeback-device = /dev/zvol/pool/wb
[unlimited]
host-memory-limit = none
zram-resident-limit = 0
""")
    devs = config.load(root)
    assert list(devs) == ["fits", "unlimited"]
    fits = devs["fits"]
    assert (fits.mem_limit, fits.writeback_device) == (
        1024 * MiB, "/dev/zvol/pool/wb")
    assert fits.plugin_params()[-2:] == ["mem_limit=%d" % (1024 * MiB),
                                         "backing_dev=/dev/zvol/pool/wb"]
    assert devs["unlimited"].mem_limit == 0


def test_ram_is_whole_mib(root):
    # zram-generator's own test figure: 8013220 kB is 7825 MiB, not 7825.41.
    write(root, "proc/meminfo", "MemTotal:        8013220 kB\n")
    write(root, "etc/zramd/zramd.conf", "[z]\nzram-size = ram / 2\n")
    assert config.load(root)["z"].size == 7825 * MiB // 2 // 4096 * 4096


def test_line_continuation(root):
    write(root, "etc/zramd/zramd.conf",
          "[d]\nzram-size = min(ram / 2, \\\n   1024)\n")
    assert config.load(root)["d"].size == 1024 * MiB


# --- zram-size expressions --------------------------------------------------

@pytest.mark.parametrize("expr, expected", [
    ("min(ram / 2, 4096)", 4096.0),
    ("ram", 8192.0),
    ("ram * 0.25", 2048.0),
    ("min(min(ram, 4096) + max(ram - 4096, 0) / 2, 32 * 1024)", 6144.0),
    ("2 ^ 10", 1024.0),
    ("2 + 3 ^ 2", 11.0),             # a power binds tighter than +
    ("2 ^ 3 ^ 2", 512.0),            # and to the right
    ("2 ** 3", 8.0),
    ("-(-ram) % 1000", 192.0),
    ("int(ram / 3)", 2730.0),
    # Halves round away from zero, as fasteval (Rust) rounds them.
    ("round(2.5) + ceil(0.1) + floor(1.9) + abs(-1)", 6.0),
    ("round(-2.5)", -3.0),
    ("round(0.5, 1.3)", 1.5),
    # fasteval's SI suffixes (decimal), and zram-generator's own tests.
    ("500k", 500000.0),
    ("32G", 32e9),
    ("2M + 1.5K + 2T / 1e12", 2001502.0),
    ("250m * 4", 1.0),
    ("4u * 1e6 + 5n * 1e9 + 7p * 1e12", 16.0),
    ("0.5 * ram", 4096.0),
    # fasteval's constant functions, sign and trigonometric functions.
    ("e() + pi() - e - pi", 0.0),
    ("sign(-ram) + sign(2)", 0.0),
    ("round(1000 * (sin(pi / 2) + cos(0) + tan(0) + asin(1) + acos(1) + "
     "atan(0) + sinh(0) + cosh(0) + tanh(0) + asinh(0) + acosh(1) + "
     "atanh(0)))", 4571.0),
    ("log(1000)", 3.0),
    ("log(2, 1024)", 10.0),
    ("sqrt(ram * 2)", 128.0),
    ("max(1, 2, 3)", 3.0),
    ("floor(pi) + floor(e)", 5.0),
    ("1e3", 1000.0),
])
def test_expressions(expr, expected):
    assert config.evaluate(expr, {"ram": 8192.0}) == pytest.approx(expected)


@pytest.mark.parametrize("expr, message", [
    ("__import__('os')", "unknown function '__import__'"),
    ("__import__('os').system('true')", "unsupported syntax 'Call'"),
    ("ram.__class__", "unsupported syntax 'Attribute'"),
    ("open('x')", "unknown function 'open'"),
    ("swap / 2", "unknown name 'swap'"),
    ("'a' + 1", "is not a number"),
    ("True", "is not a number"),
    ("[1][0]", "unsupported syntax"),
    ("lambda: 1", "unsupported syntax 'Lambda'"),
    ("ram if ram else 1", "unsupported syntax 'IfExp'"),
    ("ram < 1", "unsupported syntax 'Compare'"),
    ("ram / 0", "division by zero"),
    ("ram % 0", "modulo by zero"),
    ("9 ^ 9 ^ 9", "math range error"),
    ("min()", "min takes"),
    ("abs(1, 2)", "abs takes"),
    ("min(*[1])", "plain arguments"),
    ("max(x=1)", "plain arguments"),
    ("log(0)", "log:"),
    ("sqrt(-1)", "sqrt of a negative"),
    ("ram /", "syntax error"),
    ("2G2", "syntax error"),
    ("2Q", "syntax error"),
    ("ram / e(1)", "e takes 0 argument(s), got 1"),
    ("(ram - 100) / 0", "division by zero"),
    ("1" * 2000, "longer than"),
    # Issue 17 F7: these escaped as OverflowError, ValueError and
    # RecursionError instead of a ConfigError naming the expression.
    ("9" * 400, "int too large to convert to float"),
    ("(1e308*10) % 2", "math domain error"),
    ("-" * 995 + "1", "nested too deeply"),
    ("(" * 300 + "1" + ")" * 300, "syntax error"),
])
def test_expression_errors(expr, message):
    with pytest.raises(ConfigError) as exc:
        config.evaluate(expr, {"ram": 8192.0})
    assert message in exc.value.message


# --- compression-algorithm and sizes ----------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("lz4", ("lz4", None, None)),
    ("lz4hc(level=9)", ("lz4hc", 9, None)),
    ("zstd( level = -3 , dict=/etc/zramd/dict )", ("zstd", -3, "/etc/zramd/dict")),
    ("deflate()", ("deflate", None, None)),
])
def test_algorithm(value, expected):
    assert config.parse_algorithm(value) == expected


@pytest.mark.parametrize("value, message", [
    ("842", "unknown algorithm '842' (accepted: lz4,"),
    ("zstd(level=x)", "level 'x' is not an integer"),
    ("zstd(dict=relative)", "not an absolute path"),
    ("zstd(speed=1)", "unknown parameter 'speed' (accepted: level, dict)"),
    ("zstd(level)", "expected key=value"),
    ("zstd(level=1,)", "empty parameter"),
    ("zstd(level=1", "expected NAME, NAME(level=N, dict=PATH), then"),
    ("zstd lz4", "expected NAME or NAME(level=N, dict=PATH)"),
])
def test_algorithm_errors(value, message):
    with pytest.raises(ConfigError) as exc:
        config.parse_algorithm(value)
    assert message in exc.value.message


@pytest.mark.parametrize("value, expected", [
    ("0", 0), ("4096", 4096), ("512M", 512 * MiB), ("2g", 2 << 30),
    ("1GiB", 1 << 30), ("64K", 65536), ("1T", 1 << 40),
])
def test_sizes(value, expected):
    assert config.parse_size(value) == expected


# --- errors name file, line, section and key ---------------------------------

@pytest.mark.parametrize("body, line, fragment", [
    ("[zramd0]\nzram-size = rm / 2\n", 2, "[zramd0] zram-size: 'rm / 2': unknown name 'rm'"),
    ("[zramd0]\nzram-size = ram - 100000\n", 2, "[zramd0] zram-size: 'ram - 100000' is negative"),
    ("[zramd0]\n\nswap-priority = high\n", 3, "[zramd0] swap-priority: 'high': expected an integer from -1 to 32767"),
    ("[zramd0]\nswap-priority = 40000\n", 2, "swap-priority"),
    ("[zramd0]\ncompression-algorithm = 842\n", 2, "[zramd0] compression-algorithm: unknown algorithm '842' (accepted: lz4, lz4hc, zstd, deflate, lzo-rle, lzo)"),
    ("[zramd0]\nmem-limit = lots\n", 2, "[zramd0] mem-limit: 'lots': expected bytes"),
    ("[zramd0]\nmount-point = relative/dir\n", 2, "[zramd0] mount-point: 'relative/dir' is not an absolute path"),
    ("[zramd0]\nfs-type = ext4\n", 2, "[zramd0] fs-type: file system 'ext4' needs a mount-point"),
    ("[zramd0]\nfs-type = swap\nmount-point = /mnt\n", 3, "[zramd0] mount-point: a swap device has no mount point"),
    ("[zramd0]\nfs-type = Ext 4\n", 2, "[zramd0] fs-type"),
    ("[zramd0]\noptions = discard, noatime\n", 2, "[zramd0] options"),
    ("[zramd0]\nzram-sise = 100\n", 2, "[zramd0] zram-sise: unknown key (accepted: zram-size,"),
    ("zram-size = 100\n", 1, "zram-size: setting outside of a [device] section"),
    ("[zramd0]\njust words\n", 2, "expected 'key = value' or '[section]'"),
    ("[zramd0\n", 1, "malformed section header"),
    ("[bad/name]\n", 1, "[bad/name]: bad device name"),
    ("[zramd0]\nhost-memory-limit = 4G\n", 2, "[zramd0] host-memory-limit: '4G': expected 'none' or whole MiB"),
    ("[zramd0]\nmem-limit = 1G\nzram-resident-limit = 512\n", 2, "[zramd0] mem-limit: and zram-resident-limit both set"),
    ("[zramd0]\nzram-resident-limit = -ram\n", 2, "[zramd0] zram-resident-limit: '-ram' is negative"),
    ("[zramd0]\nzram-resident-limit = ram * 1e15\n", 2, "[zramd0] zram-resident-limit: mem_limit: "),
    ("[zramd0]\nwriteback-device = sdb2\n", 2, "[zramd0] writeback-device: 'sdb2' is not an absolute path"),
    # What only the plugin's own checks know: refused here, so that the
    # generator enables nothing the server would then refuse.
    ("[zramd0]\ncompression-algorithm = lz4(level=3)\n", 2, "[zramd0] compression-algorithm: level: lz4 takes no level; got 3"),
    ("[zramd0]\ncompression-algorithm = zstd(level=99)\n", 2, "[zramd0] compression-algorithm: level: 99 out of range for zstd"),
    ("[zramd0]\ncompression-algorithm = zstd(dict=/nonexistent/x.dict)\n", 2, "[zramd0] compression-algorithm: dict: cannot read /nonexistent/x.dict"),
    ("[zramd0]\nzram-size = 1e30\n", 2, "[zramd0] zram-size: size: '1048576000000000020850540374818553856' is too large"),
])
def test_errors_name_file_line_and_key(root, body, line, fragment):
    path = write(root, "etc/zramd/zramd.conf", body)
    with pytest.raises(ConfigError) as exc:
        config.load(root)
    msg = exc.value.message
    assert msg.startswith("%s:%d: " % (path, line)), msg
    assert fragment in msg
    assert exc.value.errno == 22


def test_error_in_dropin_names_the_dropin(root):
    write(root, "etc/zramd/zramd.conf", "[zramd0]\nzram-size = 100\n")
    bad = write(root, "run/zramd/zramd.conf.d/90-bad.conf",
                "[zramd0]\n# set it\nzram-size = ram / zero\n")
    with pytest.raises(ConfigError) as exc:
        config.load(root)
    assert exc.value.message.startswith(bad + ":3: [zramd0] zram-size: ")


def test_error_reports_line_of_the_value_in_force(root):
    # A bad value overridden by a good one later is not an error...
    write(root, "etc/zramd/zramd.conf", "[zramd0]\nswap-priority = x\n")
    write(root, "etc/zramd/zramd.conf.d/10.conf", "[zramd0]\nswap-priority = 3\n")
    assert config.load(root)["zramd0"].swap_priority == 3


def test_bad_file_changes_nothing(root):
    good = write(root, "etc/zramd/zramd.conf", "[zramd0]\nzram-size = 100\n")
    before = config.load(root)
    write(root, "etc/zramd/zramd.conf.d/10.conf", "[zramd0]\nzram-size = (\n")
    with pytest.raises(ConfigError):
        config.load(root)
    os.unlink(os.path.join(root, "etc/zramd/zramd.conf.d/10.conf"))
    assert config.load(root) == before
    assert open(good).read() == "[zramd0]\nzram-size = 100\n"


def test_unreadable_meminfo(tmp_path):
    write(tmp_path, "etc/zramd/zramd.conf", "[zramd0]\n")
    with pytest.raises(ConfigError) as exc:
        config.load(tmp_path)
    assert "proc/meminfo: cannot read MemTotal" in exc.value.message
    assert config.load(tmp_path, ram_mib=1024)["zramd0"].size == 512 * MiB


def test_real_meminfo():
    assert config.mem_total_mib("/") > 16


def test_device_config_is_frozen():
    d = DeviceConfig(name="x", size=4096)
    with pytest.raises(Exception):
        d.size = 0


# --- zram-generator's own documentation ---------------------------------------
#
# zram-generator 1.2's zram-generator.conf.example, verbatim but for the
# section names' file (zramd.conf) and the comments.

EXAMPLE = """\
# This file is part of the zram-generator project
# https://github.com/systemd/zram-generator

# At the top level, a set!variable = program
# directive executes /bin/sh -c program,
# parses the output as an expression, and remembers it in variable,
# usable in later set! and zram-size/zram-resident-limit.
set!maxhotplug = xenstore-read /local/domain/$(xenstore-read domid)/memory/hotplug-max

[zram0]
# This section describes the settings for /dev/zram0.
#
# The maximum amount of memory (in MiB). If the machine has more RAM
# than this, zram device will not be created.
#
# "host-memory-limit = none" may be used to disable this limit. This
# is also the default.
host-memory-limit = 9048

# The size of the zram device, as a function of MemTotal, both in MB.
# For example, if the machine has 1 GiB, and zram-size=ram/4,
# then the zram device will have 256 MiB.
# Fractions in the range 0.1\u20130.5 are recommended.
#
# The default is "min(ram / 2, 4096)".
zram-size = min(ram / 10, 2048)

# The maximum memory resident for this zram device, as a function of MemTotal,
# both in MB.
# For example, if the machine has 1 GiB, and zram-resident-limit=ram/8,
# then this device will not consume more than 128 MiB.
#
# 0 means no limit; this is the default.
zram-resident-limit = maxhotplug * 3/4

# The compression algorithm to use for the zram device,
# or leave unspecified to keep the kernel default.
#
# Subsequent algorithms are used for recompression.
# Comma-separated parameters may be specified in parentheses.
#
# Parameters without a compression algorithm are set as
# global recompression parameters.
compression-algorithm = lzo-rle zstd(level=3) (type=idle)

# By default, file systems and swap areas are trimmed on-the-go
# by setting "discard".
# Setting this to the empty string clears the option.
options =

# Write incompressible pages to this device,
# as there's no gain from keeping them in RAM
writeback-device = /dev/zvol/tarta-zoot/swap-writeback

# The following options are deprecated, and override zram-size.
# These values would be equivalent to the zram-size setting above.
#zram-fraction = 0.10
#max-zram-size = 2048


[zram1]
# This section describes the settings for /dev/zram1.
#
# host-memory-limit is not specified, so this device will always be created.

# Size the device to a tenth of RAM.
zram-size = ram / 10

# The file system to put on the device. If not specified, ext2 will be used.
fs-type = ext2

# Where to mount the file system. If a mount point is not specified,
# the device will be initialized, but will not be used for anything.
mount-point = /run/compressed-mount-point
"""


@pytest.fixture
def fake_xen(tmp_path, monkeypatch):
    """xenstore-read on PATH, answering as a Xen guest whose memory may be
    hot-plugged up to 16 GiB (xenstore gives KiB; the example's expression
    treats the answer as MiB, so print MiB)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    prog = bindir / "xenstore-read"
    prog.write_text('#!/bin/sh\ncase "$1" in\n  domid) echo 7 ;;\n'
                    '  /local/domain/7/memory/hotplug-max) echo 16384 ;;\n'
                    '  *) echo "no such key: $1" >&2; exit 1 ;;\nesac\n')
    prog.chmod(0o755)
    monkeypatch.setenv("PATH", "%s:%s" % (bindir, os.environ["PATH"]))
    return bindir


def test_example_config_works(root, fake_xen):
    write(root, "etc/zramd/zramd.conf", EXAMPLE)
    warnings = []
    devs = config.load(root, warn=warnings.append)
    assert warnings == []
    assert list(devs) == ["zram0", "zram1"]
    z0, z1 = devs["zram0"], devs["zram1"]
    # ram 8192 MiB (below host-memory-limit 9048); maxhotplug 16384.
    assert z0.size == int(819.2 * MiB) // 4096 * 4096
    assert z0.mem_limit == 12288 * MiB
    assert (z0.algorithm, z0.level) == ("lzo-rle", None)
    assert z0.recomp_algorithms == (("zstd", 3),)
    assert (z0.recompress_type, z0.recompress_max_pages) == ("idle", 0)
    assert z0.options == ""
    assert z0.writeback_device == "/dev/zvol/tarta-zoot/swap-writeback"
    assert z0.plugin_params() == [
        "size=%d" % z0.size, "algorithm=lzo-rle",
        "mem_limit=%d" % (12288 * MiB),
        "backing_dev=/dev/zvol/tarta-zoot/swap-writeback",
        "recomp_algorithm=algo=zstd priority=1 level=3",
        "policy_interval=%d" % config.RECOMPRESS_INTERVAL,
        "policy_recompress=idle"]
    assert (z1.fs_type, z1.mount_point) == ("ext2",
                                            "/run/compressed-mount-point")
    assert z1.size == int(819.2 * MiB) // 4096 * 4096
    # The example's own note: its deprecated lines give the same size.
    write(root, "etc/zramd/zramd.conf", EXAMPLE.replace(
        "#zram-fraction", "zram-fraction").replace(
        "#max-zram-size", "max-zram-size"))
    devs = config.load(root, warn=warnings.append)
    assert devs["zram0"].size == 819 * MiB
    assert devs["zram0"].size_expr == "min(int(ram * 0.1), 2048)"
    assert [w.split(": ", 1)[1] for w in warnings] == [
        "[zram0] zram-fraction: obsolete, use zram-size instead",
        "[zram0] max-zram-size: obsolete, use zram-size instead",
        "[zram0] zram-size: overridden by the obsolete zram-fraction and "
        "max-zram-size"]


def test_example_config_without_xen_names_the_line(root):
    # Not a Xen guest: xenstore-read is not there; the set! line is named.
    path = write(root, "etc/zramd/zramd.conf", EXAMPLE)
    with pytest.raises(ConfigError) as exc:
        config.load(root)
    msg = exc.value.message
    assert msg.startswith(path + ":8: set!maxhotplug: 'xenstore-read "
                          "/local/domain/$(xenstore-read domid)/memory/"
                          "hotplug-max' failed (exit 127): "), msg
    assert "not found" in msg and "\n" not in msg


# The man page's examples, each as the man page writes it.
@pytest.mark.parametrize("line, field, value", [
    ("zram-size = min(min(ram, 4096) + max(ram - 4096, 0) / 2, 32 * 1024)",
     "size", 6144 * MiB),
    ("zram-size = min(ram / 2, 4096)", "size", 4096 * MiB),
    ("host-memory-limit = none", "size", 4096 * MiB),
    ("zram-resident-limit = 0", "mem_limit", 0),
    ("writeback-device = /dev/disk/by-partuuid/2d54ffa0-01",
     "writeback_device", "/dev/disk/by-partuuid/2d54ffa0-01"),
    ("writeback-device = /dev/zvol/tarta-zoot/swap-writeback",
     "writeback_device", "/dev/zvol/tarta-zoot/swap-writeback"),
    ("swap-priority = 32767", "swap_priority", 32767),
    ("swap-priority = -1", "swap_priority", -1),
    ("options = discard", "options", "discard"),
    ("options =", "options", ""),
    ("compression-algorithm = lz4 zstd(level=9) (type=idle)",
     "recomp_algorithms", (("zstd", 9),)),
    ("memory-limit = none", "size", 4096 * MiB),
    ("zram-fraction = 0.5", "size", 4096 * MiB),
    ("max-zram-size = none", "size", 4096 * MiB),
    ("max-zram-size = 4096", "size", 4096 * MiB),
])
def test_man_page_examples(root, line, field, value):
    write(root, "etc/zramd/zramd.conf", "[zram0]\n%s\n" % line)
    assert getattr(config.load(root, warn=lambda m: None)["zram0"],
                   field) == value


# --- compression-algorithm lists ----------------------------------------------

A = config.Algorithms


@pytest.mark.parametrize("value, expected", [
    ("lz4", A(("lz4", None, None))),
    ("zstd(level=3, dict=/d)", A(("zstd", 3, "/d"))),
    ("lz4 zstd(level=9) (type=idle)",
     A(("lz4", None, None), (("zstd", 9),), "idle")),
    ("lzo-rle zstd(level=3) (type=idle)",
     A(("lzo-rle", None, None), (("zstd", 3),), "idle")),
    # zram-generator issue #215's configuration
    ("lz4 zstd(level=1) zstd(level=3) (type=idle)",
     A(("lz4", None, None), (("zstd", 1), ("zstd", 3)), "idle")),
    ("zstd  deflate lz4hc(level=12)\t(type=huge_idle,max_pages=1000)",
     A(("zstd", None, None), (("deflate", None), ("lz4hc", 12)),
       "huge_idle", 1000)),
    ("lz4 zstd", A(("lz4", None, None), (("zstd", None),))),
    ("lz4 (type=huge) zstd", A(("lz4", None, None), (("zstd", None),),
                               "huge")),
])
def test_algorithm_lists(value, expected):
    assert config.parse_algorithms(value) == expected


@pytest.mark.parametrize("value, message", [
    ("lz4 (type=idle)", "global recompression parameters without a "
     "recompression algorithm"),
    ("(type=idle)", "no algorithm"),
    ("lz4 zstd (threshold=1024)", "unknown parameter 'threshold' (accepted: "
     "type, max_pages) for the global recompression parameters"),
    ("lz4 zstd (type=cold)", "type 'cold'; accepted: idle huge huge_idle"),
    ("lz4 zstd (max_pages=10)", "type= missing"),
    ("lz4 zstd (type=idle, max_pages=0)", "max_pages '0'"),
    ("lz4 zstd (type=idle) (type=huge)", "two groups"),
    ("lz4 zstd(dict=/d)", "zstd: unknown parameter 'dict' (accepted: level) "
     "for a recompression algorithm"),
    ("zstd (level=3)", "a parameter of an algorithm follows its name "
     "without a space"),
    ("lz4 zstd deflate lz4hc lzo", "4 recompression algorithms; accepted: "
     "at most 3"),
    ("lz4 842", "unknown algorithm '842'"),
    ("lz4 zstd(level=x)", "level 'x' is not an integer"),
    ("lz4 zstd)", "expected NAME"),
])
def test_algorithm_list_errors(value, message):
    with pytest.raises(ConfigError) as exc:
        config.parse_algorithms(value)
    assert message in exc.value.message


def test_algorithm_list_checked_by_the_plugin(root):
    path = write(root, "etc/zramd/zramd.conf",
                 "[z]\ncompression-algorithm = lz4 zstd(level=99)\n")
    with pytest.raises(ConfigError) as exc:
        config.load(root)
    assert exc.value.message == (
        "%s:2: [z] compression-algorithm: recomp_algorithm: level: 99 out "
        "of range for zstd; accepted: 1..22" % path)


def test_algorithm_list_plugin_params(root):
    write(root, "etc/zramd/zramd.conf", "[z]\nzram-size = 64\n"
          "compression-algorithm = lzo zstd(level=9) deflate "
          "(type=huge_idle, max_pages=500)\n")
    d = config.load(root)["z"]
    assert d.plugin_params() == [
        "size=%d" % (64 * MiB), "algorithm=lzo",
        "recomp_algorithm=algo=zstd priority=1 level=9,"
        "algo=deflate priority=2",
        "policy_interval=%d" % config.RECOMPRESS_INTERVAL,
        "policy_recompress=huge_idle", "policy_max_pages=500"]
    # The plugin takes exactly these.
    from zramd.params import ParamParser
    parser = ParamParser()
    for param in d.plugin_params():
        parser.set(*param.split("=", 1))
    p = parser.complete(check_control=False)
    assert p.recomp_algorithm == (("zstd", 1, 9), ("deflate", 2, None))
    assert (p.policy_interval, p.policy_recompress, p.policy_max_pages) == (
        config.RECOMPRESS_INTERVAL, "huge_idle", 500)


# --- set!VAR = program ---------------------------------------------------------

def test_set_variables(root):
    write(root, "etc/zramd/zramd.conf", """\
set!two = echo 2
set!base = echo "ram / 16"
set!more = echo base + two
[z]
zram-size = ram / 8 * two
zram-resident-limit = more
""")
    d = config.load(root)["z"]
    assert d.size == 2048 * MiB
    assert d.mem_limit == 514 * MiB


def test_set_in_dropin_reaches_every_file(root):
    # As in zram-generator, sizes are evaluated once every file is read.
    write(root, "etc/zramd/zramd.conf", "[z]\nzram-size = ram * frac\n")
    write(root, "etc/zramd/zramd.conf.d/10-frac.conf",
          "set!frac = printf '0.%s' 25\n")
    assert config.load(root)["z"].size == 2048 * MiB


@pytest.mark.parametrize("directive, message", [
    ("set!x = exit 3", "set!x: 'exit 3' failed (exit 3)"),
    ("set!x = echo oops >&2; exit 1", "failed (exit 1): oops"),
    ("set!x = kill -9 $$", "failed (signal 9)"),
    ("set!x = true", "'true' printed nothing; expected a number"),
    ("set!x = echo hello", "'echo hello' printed 'hello': unknown name "
     "'hello'"),
    ("set!x = echo 1 +", "printed '1 +': syntax error"),
    ("set!x = printf '\\377'", "printed bytes that are not UTF-8"),
    ("set!x = echo y", "unknown name 'y'"),           # not defined yet
    ("set!2x = echo 1", "set!2x: bad variable name '2x'"),
    ("set!ram = echo 1", "set!ram: bad variable name 'ram'"),
    ("set!min = echo 1", "bad variable name 'min'"),
    ("set! = echo 1", "bad variable name ''"),
])
def test_set_errors_name_the_line(root, directive, message):
    path = write(root, "etc/zramd/zramd.conf",
                 "# first\n%s\nset!y = echo 1\n[z]\n" % directive)
    with pytest.raises(ConfigError) as exc:
        config.load(root)
    assert exc.value.message.startswith(path + ":2: set!"), exc.value.message
    assert message in exc.value.message


def test_set_run_time_is_bounded(root, monkeypatch):
    import time
    monkeypatch.setattr(config, "SET_TIMEOUT", 1)
    path = write(root, "etc/zramd/zramd.conf",
                 "set!slow = sleep 30 & sleep 30; echo 1\n[z]\n")
    start = time.monotonic()
    with pytest.raises(ConfigError) as exc:
        config.load(root)
    assert time.monotonic() - start < 10
    assert exc.value.message == (
        "%s:1: set!slow: 'sleep 30 & sleep 30; echo 1' did not finish in 1 "
        "seconds; killed" % path)


def test_set_run_time_is_bounded_for_escaped_children(root, monkeypatch):
    # A child in its own session keeps the output pipe open; the limit
    # still holds.
    import time
    monkeypatch.setattr(config, "SET_TIMEOUT", 1)
    write(root, "etc/zramd/zramd.conf",
          "set!d = setsid sleep 4 & sleep 20\n[z]\n")
    start = time.monotonic()
    with pytest.raises(ConfigError, match="did not finish in 1 seconds"):
        config.load(root)
    assert time.monotonic() - start < 10


def test_set_has_no_stdin(root):
    write(root, "etc/zramd/zramd.conf", "set!n = cat; echo 64\n[z]\n"
          "zram-size = n\n")
    assert config.load(root)["z"].size == 64 * MiB


# --- obsolete and unknown keys -------------------------------------------------

def test_memory_limit_is_host_memory_limit(root):
    warnings = []
    path = write(root, "etc/zramd/zramd.conf", "[small]\nmemory-limit = 4096\n"
                 "[big]\nmemory-limit = 4096\nhost-memory-limit = none\n"
                 "[none]\nhost-memory-limit = 100\nmemory-limit = none\n")
    assert list(config.load(root, warn=warnings.append)) == ["big", "none"]
    # Only where memory-limit is the value in force is it reported.
    assert warnings == [
        "%s:2: [small] memory-limit: obsolete, use host-memory-limit instead"
        % path,
        "%s:8: [none] memory-limit: obsolete, use host-memory-limit instead"
        % path]
    # zramd's own mem-limit is another key: the pool's cap.
    write(root, "etc/zramd/zramd.conf", "[z]\nmem-limit = 1G\n")
    assert config.load(root)["z"].mem_limit == 1 << 30


@pytest.mark.parametrize("lines, size_mib, expr", [
    ("zram-fraction = 0.25", 2048, "int(ram * 0.25)"),
    ("zram-fraction = 0.3", 2457, "int(ram * 0.3)"),   # whole MiB, as z-g
    ("max-zram-size = 1024", 1024, "min(int(ram * 0.5), 1024)"),
    ("zram-fraction = 2\nmax-zram-size = none", 16384, "int(ram * 2.0)"),
    ("zram-size = 100\nzram-fraction = 0", 0, None),
])
def test_zram_fraction_and_max_zram_size(root, lines, size_mib, expr):
    write(root, "etc/zramd/zramd.conf", "[z]\n%s\n" % lines)
    devs = config.load(root, warn=lambda m: None)
    if not size_mib:
        assert devs == {}
        return
    assert devs["z"].size == size_mib * MiB
    assert devs["z"].size_expr == expr


@pytest.mark.parametrize("line, message", [
    ("zram-fraction = -0.5", "[z] zram-fraction: '-0.5': expected a number "
     ">= 0"),
    ("zram-fraction = half", "[z] zram-fraction: 'half': expected a number"),
    ("max-zram-size = 4G", "[z] max-zram-size: '4G': expected 'none' or "
     "whole MiB"),
    ("memory-limit = lots", "[z] memory-limit: 'lots'"),
])
def test_obsolete_key_errors(root, line, message):
    path = write(root, "etc/zramd/zramd.conf", "[z]\n%s\n" % line)
    with pytest.raises(ConfigError) as exc:
        config.load(root, warn=lambda m: None)
    assert exc.value.message.startswith(path + ":2: " + message)


UNKNOWN = """\
sizes = ram
[zramd0]
zram-sise = 100
swap-priority = 7
[bad/name]
zram-size = 1
[zramd1]
zram-size = 64
"""


def test_unknown_keys_refused_by_default(root):
    path = write(root, "etc/zramd/zramd.conf", UNKNOWN)
    with pytest.raises(ConfigError) as exc:
        config.load(root)
    assert exc.value.message.startswith(
        path + ":1: sizes: setting outside of a [device] section")


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_unknown_keys_warned_and_ignored(root, monkeypatch, how):
    path = write(root, "etc/zramd/zramd.conf", UNKNOWN)
    warnings = []
    if how == "argument":
        devs = config.load(root, unknown_keys="warn", warn=warnings.append)
    else:
        monkeypatch.setenv("ZRAMD_UNKNOWN_KEYS", "warn")
        devs = config.load(root, warn=warnings.append)
    assert list(devs) == ["zramd0", "zramd1"]
    assert devs["zramd0"].swap_priority == 7
    assert devs["zramd0"].size == 4096 * MiB       # the default
    assert [w.replace(path, "F") for w in warnings] == [
        "F:1: sizes: setting outside of a [device] section, ignored",
        "F:3: [zramd0] zram-sise: unknown key (accepted: zram-size, "
        "compression-algorithm, swap-priority, fs-type, mount-point, "
        "options, fs-create-options, mem-limit, zram-resident-limit, "
        "host-memory-limit, writeback-device), ignored",
        "F:5: [bad/name]: bad device name (letters, digits, '_', '.', '-', "
        "at most 64, not starting with a punctuation mark), ignored",
    ]


def test_unknown_directive(root):
    path = write(root, "etc/zramd/zramd.conf", "frob!x = 1\n[z]\n")
    with pytest.raises(ConfigError) as exc:
        config.load(root)
    assert exc.value.message == (
        "%s:1: frob!x: unknown directive (accepted: set!VARIABLE = program)"
        % path)
    warnings = []
    assert list(config.load(root, unknown_keys="warn",
                            warn=warnings.append)) == ["z"]
    assert warnings == [exc.value.message + ", ignored"]


def test_unknown_keys_mode_checked(root, monkeypatch):
    write(root, "etc/zramd/zramd.conf", "[z]\n")
    monkeypatch.setenv("ZRAMD_UNKNOWN_KEYS", "ignore")
    with pytest.raises(ConfigError) as exc:
        config.load(root)
    assert exc.value.message == ("ZRAMD_UNKNOWN_KEYS: 'ignore'; accepted: "
                                 "error warn")


def test_warnings_go_to_stderr_by_default(root, capsys):
    path = write(root, "etc/zramd/zramd.conf", "[z]\nmemory-limit = none\n")
    config.load(root)
    assert capsys.readouterr().err == (
        "zramd: warning: %s:2: [z] memory-limit: obsolete, use "
        "host-memory-limit instead\n" % path)


def test_improbable_size_warned(root):
    # zram-generator's warning: the device would need more than 32:1.
    path = write(root, "etc/zramd/zramd.conf",
                 "[ok]\nzram-size = ram * 32\n[units]\nzram-size = 4G\n")
    warnings = []
    assert list(config.load(root, warn=warnings.append)) == ["ok", "units"]
    assert warnings == [
        "%s:4: [units] zram-size: 4G = 4194304000000000 bytes would "
        "need an improbable compression ratio of 488281 with 8192 MiB of "
        "RAM; units may be wrong (a size is in MiB, and G is 1e9)" % path]


# --- fs-create-options and quoting ---------------------------------------------

@pytest.mark.parametrize("value, words", [
    ("-L zram-tmp", ("-L", "zram-tmp")),
    ('"-E lazy_itable_init=0,lazy_journal_init=0 -m0 -T small"',
     ("-E", "lazy_itable_init=0,lazy_journal_init=0", "-m0", "-T", "small")),
    ("-L 'my label' -m 0", ("-L", "my label", "-m", "0")),
    ("", ()),
])
def test_fs_create_options(root, value, words):
    write(root, "etc/zramd/zramd.conf",
          "[tmp]\nfs-type = ext4\nmount-point = /tmp\n"
          "fs-create-options = %s\n" % value)
    d = config.load(root)["tmp"]
    assert d.fs_create_options == words
    assert all(not p.startswith("fs") for p in d.plugin_params())


@pytest.mark.parametrize("body, fragment", [
    ("fs-create-options = -L x\n", "[z] fs-create-options: a swap device "
     "is made by mkswap, not mkfs; accepted with mount-point"),
    ("mount-point = /m\nfs-create-options = -L 'x\n",
     "[z] fs-create-options: \"-L 'x\": No closing quotation"),
])
def test_fs_create_options_errors(root, body, fragment):
    write(root, "etc/zramd/zramd.conf", "[z]\n" + body)
    with pytest.raises(ConfigError) as exc:
        config.load(root)
    assert fragment in exc.value.message


def test_quoted_values(root):
    # zram-generator's ini reader drops one pair of enclosing quotes.
    write(root, "etc/zramd/zramd.conf", "[z]\nzram-size = \"ram / 4\"\n"
          "compression-algorithm = 'zstd(level=5)'\noptions = \"\"\n")
    d = config.load(root)["z"]
    assert (d.size, d.algorithm, d.level, d.options) == (
        2048 * MiB, "zstd", 5, "")


def test_page_size_is_the_c_headers():
    # config.py writes PAGE_SIZE out so that the generator needs no C
    # extension; it must be zram_defs.h's.
    from zramd import _fastpath, config as config_module
    assert config_module.PAGE_SIZE == _fastpath.PAGE_SIZE
