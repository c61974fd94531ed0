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
    ("round(2.5) + ceil(0.1) + floor(1.9) + abs(-1)", 5.0),
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
    ("1" * 2000, "longer than"),
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
    ("lzo", "unknown algorithm 'lzo' (accepted: lz4,"),
    ("zstd(level=x)", "level 'x' is not an integer"),
    ("zstd(dict=relative)", "not an absolute path"),
    ("zstd(speed=1)", "unknown parameter 'speed' (accepted: level, dict)"),
    ("zstd(level)", "expected key=value"),
    ("zstd(level=1,)", "empty parameter"),
    ("zstd(level=1", "expected NAME or NAME(level=N, dict=PATH)"),
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
    ("[zramd0]\ncompression-algorithm = lzo\n", 2, "[zramd0] compression-algorithm: unknown algorithm 'lzo' (accepted: lz4, lz4hc, zstd, deflate)"),
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
