"""zramd.conf: which devices ``zramd up`` and the systemd units bring up.

The format and the search rules follow zram-generator.conf(5).  Each device
is one section named for it; every key is optional::

    [zramd0]
    zram-size = min(ram / 2, 4096)        # MiB, an expression of ram (MiB)
    compression-algorithm = zstd(level=3)
    swap-priority = 100                   # swap devices only
    fs-type = swap                        # or ext4, ext2, xfs, ...
    mount-point = /var/compressed         # file-system devices only
    options = discard                     # swapon -o / mount -o
    mem-limit = 1G                        # cap on the pool (0: none)
    zram-resident-limit = ram / 8         # the same cap, in MiB of ram
    host-memory-limit = 9048              # MiB: no device on more RAM
    writeback-device = /dev/sdb2          # backing_dev for writeback

Files are read from four directories, lowest precedence first::

    ROOT/usr/lib/zramd/ < ROOT/usr/local/lib/zramd/ < ROOT/etc/zramd/
                        < ROOT/run/zramd/

Of the main files ``zramd.conf`` only the one in the highest-precedence
directory is read: ``/etc/zramd/zramd.conf`` replaces the vendor's file
rather than adding to it.  Then the drop-ins ``zramd.conf.d/*.conf`` of all
four directories are read in the lexicographic order of their file names,
whichever directory holds them; a drop-in in a higher-precedence directory
hides one of the same name in a lower one, and an empty file or a symlink to
``/dev/null`` masks it.  Later files override earlier ones key by key, so a
drop-in may change one key of a device that another file defines.

The syntax is systemd's (systemd.syntax(5)) as far as zramd needs it:
``[section]`` headers, ``key = value`` lines, comments starting with ``#``
or ``;``, blank lines, a trailing backslash that continues a value on the
next line, and an empty value (``key =``) that resets the key to its
default (but ``options =`` means no options, as in zram-generator).
Anything else, an unknown key, or a bad value is a
:class:`~zramd.errors.ConfigError` naming the file, line, section and key;
:func:`load` either returns the whole configuration or raises, so a bad file
changes nothing.

``zram-size`` is evaluated by a small arithmetic evaluator over Python's
``ast`` (never ``eval``): numbers, ``ram`` (MemTotal in MiB, read from
``ROOT/proc/meminfo``), ``e``, ``pi``, ``+ - * / %``, ``^`` and ``**`` for
powers, parentheses, and the functions ``min max abs int round ceil floor
sqrt log``.  A device whose size works out as 0 is not brought up, as in
zram-generator.
"""

import ast
import dataclasses
import math
import operator
import os
import re

from zramd.errors import ConfigError

#: Configuration directories below the root, lowest precedence first.
SEARCH_DIRS = ("usr/lib/zramd", "usr/local/lib/zramd", "etc/zramd",
               "run/zramd")
MAIN_FILE = "zramd.conf"
DROPIN_DIR = "zramd.conf.d"

DEFAULT_SIZE = "min(ram / 2, 4096)"
DEFAULT_ALGORITHM = "lz4"
DEFAULT_PRIORITY = 100
DEFAULT_OPTIONS = "discard"
#: File system used when only ``mount-point`` is given (zram-generator's).
DEFAULT_FS_TYPE = "ext2"

#: Fallback when zramd.compress is not importable (the plugin's list).
KNOWN_ALGORITHMS = ("lz4", "lz4hc", "zstd", "deflate")

KEYS = ("zram-size", "compression-algorithm", "swap-priority", "fs-type",
        "mount-point", "options", "mem-limit", "zram-resident-limit",
        "host-memory-limit", "writeback-device")

#: A device name is used in file names and systemd instance names.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

PAGE_SIZE = 4096
MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """One configured device, every value checked.

    ``size`` and ``mem_limit`` are bytes (``size`` a multiple of 4096;
    ``mem_limit`` 0 for none).  ``fs_type`` is ``"swap"`` or a file system
    type; ``mount_point`` is None for swap.  ``sources`` lists the files
    that set any key, in reading order.
    """

    name: str
    size: int
    size_expr: str = DEFAULT_SIZE
    algorithm: str = DEFAULT_ALGORITHM
    level: int | None = None
    dict_path: str | None = None
    swap_priority: int = DEFAULT_PRIORITY
    fs_type: str = "swap"
    mount_point: str | None = None
    options: str = DEFAULT_OPTIONS
    mem_limit: int = 0
    writeback_device: str | None = None
    sources: tuple = ()

    @property
    def is_swap(self):
        return self.fs_type == "swap"

    def plugin_params(self):
        """The plugin's ``key=value`` parameters, without name and control."""
        params = ["size=%d" % self.size, "algorithm=%s" % self.algorithm]
        if self.level is not None:
            params.append("level=%d" % self.level)
        if self.dict_path is not None:
            params.append("dict=%s" % self.dict_path)
        if self.mem_limit:
            params.append("mem_limit=%d" % self.mem_limit)
        if self.writeback_device is not None:
            params.append("backing_dev=%s" % self.writeback_device)
        return params


# ---------------------------------------------------------------------------
# Reading files

def config_files(root="/"):
    """The files to read under ``root``, in reading order (main file first).

    Masked drop-ins (empty, or a symlink to /dev/null) are left out.
    """
    dirs = [os.path.join(root, d) for d in SEARCH_DIRS]
    files = []
    for d in reversed(dirs):
        path = os.path.join(d, MAIN_FILE)
        if os.path.exists(path) or os.path.islink(path):
            if not _masked(path):
                files.append(path)
            break
    dropins = {}
    for d in dirs:                       # later directories win
        dd = os.path.join(d, DROPIN_DIR)
        try:
            entries = os.listdir(dd)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.endswith(".conf"):
                dropins[entry] = os.path.join(dd, entry)
    for entry in sorted(dropins):
        if not _masked(dropins[entry]):
            files.append(dropins[entry])
    return files


def _masked(path):
    try:
        if os.path.realpath(path) == "/dev/null":
            return True
        return os.path.getsize(path) == 0
    except OSError:
        return False


def parse_file(path):
    """Parse one file into ``[(section, key, value, lineno)]``; a section
    header is an entry with key and value None, so ``[zramd0]`` alone
    defines a device with every default.

    Raises ConfigError naming the file and line for a syntax error.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("%s: cannot read: %s" % (path, e)) from None
    entries = []
    section = None
    i = 0
    while i < len(lines):
        lineno = i + 1
        line = lines[i].strip()
        i += 1
        if not line or line[0] in "#;":
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        if line.startswith("["):
            if not line.endswith("]"):
                raise ConfigError("%s:%d: malformed section header %r"
                                  % (path, lineno, line))
            section = line[1:-1].strip()
            if not NAME_RE.match(section):
                raise ConfigError(
                    "%s:%d: [%s]: bad device name (letters, digits, '_', "
                    "'.', '-', at most 64, not starting with a punctuation "
                    "mark)" % (path, lineno, section))
            entries.append((section, None, None, lineno))
            continue
        if "=" not in line:
            raise ConfigError("%s:%d: expected 'key = value' or '[section]', "
                              "got %r" % (path, lineno, line))
        key, value = (s.strip() for s in line.split("=", 1))
        if section is None:
            raise ConfigError("%s:%d: %s: setting outside of a [device] "
                              "section" % (path, lineno, key))
        if key not in KEYS:
            raise ConfigError("%s:%d: [%s] %s: unknown key (accepted: %s)"
                              % (path, lineno, section, key, ", ".join(KEYS)))
        entries.append((section, key, value, lineno))
    return entries


def mem_total_mib(root="/"):
    """MemTotal of ``ROOT/proc/meminfo`` in whole MiB, as zram-generator
    counts it."""
    path = os.path.join(root, "proc/meminfo")
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                if fields[:1] == ["MemTotal:"]:
                    return int(fields[1]) // 1024
    except (OSError, ValueError, IndexError) as e:
        raise ConfigError("%s: cannot read MemTotal: %s" % (path, e)) from None
    raise ConfigError("%s: no MemTotal line" % path)


def load(root="/", ram_mib=None):
    """Read the whole configuration under ``root``.

    Returns ``{name: DeviceConfig}`` in the order devices first appear,
    leaving out devices whose size is 0 and those whose host-memory-limit
    is below the machine's RAM.  ``ram_mib`` overrides MemTotal.
    Raises ConfigError (file, line, section and key) and nothing else.
    """
    raw = {}             # name -> {key: (value, path, lineno)}
    sources = {}
    for path in config_files(root):
        for section, key, value, lineno in parse_file(path):
            keys = raw.setdefault(section, {})
            if key is None:
                pass
            elif value or key == "options":   # 'options =': none at all
                keys[key] = (value, path, lineno)
            else:                    # 'key =' resets it, as in systemd
                keys.pop(key, None)
            srcs = sources.setdefault(section, [])
            if path not in srcs:
                srcs.append(path)
    if not raw:
        return {}
    if ram_mib is None:
        ram_mib = mem_total_mib(root)
    devices = {}
    for name, keys in raw.items():
        dev = _device(name, keys, ram_mib, tuple(sources[name]))
        if dev is not None and dev.size > 0:
            devices[name] = dev
    return devices


# ---------------------------------------------------------------------------
# Values

def _device(name, keys, ram_mib, sources):
    def where(key):
        _, path, lineno = keys[key]
        return "%s:%d: [%s] %s" % (path, lineno, name, key)

    def get(key, parse, default):
        if key not in keys:
            return default
        try:
            return parse(keys[key][0])
        except ConfigError as e:
            raise ConfigError("%s: %s" % (where(key), e.message)) from None

    def mib(key, default):
        """An expression of ``ram`` in MiB (zram-size and
        zram-resident-limit), never negative."""
        value = get(key, lambda v: evaluate(v, {"ram": ram_mib}), default)
        if value < 0:
            raise ConfigError("%s: %r is negative (%g MiB)"
                              % (where(key), keys[key][0], value))
        return value

    host_limit = get("host-memory-limit", _parse_host_memory_limit, None)
    if host_limit is not None and ram_mib > host_limit:
        return None          # more RAM than the limit: zram-generator skips
    size_expr = keys["zram-size"][0] if "zram-size" in keys else DEFAULT_SIZE
    size_mib = mib("zram-size", evaluate(DEFAULT_SIZE, {"ram": ram_mib}))
    size = int(size_mib * MiB) // PAGE_SIZE * PAGE_SIZE

    algorithm, level, dict_path = get("compression-algorithm",
                                      parse_algorithm,
                                      (DEFAULT_ALGORITHM, None, None))
    priority = get("swap-priority", _parse_priority, DEFAULT_PRIORITY)
    mount_point = get("mount-point", _parse_mount_point, None)
    fs_type = get("fs-type", _parse_fs_type,
                  DEFAULT_FS_TYPE if mount_point else "swap")
    if fs_type == "swap" and mount_point:
        raise ConfigError("%s: a swap device has no mount point (set fs-type "
                          "to a file system, or drop mount-point)"
                          % where("mount-point"))
    if fs_type != "swap" and not mount_point:
        raise ConfigError("%s: file system %r needs a mount-point"
                          % (where("fs-type"), fs_type))
    options = get("options", _parse_options, DEFAULT_OPTIONS)
    if "mem-limit" in keys and "zram-resident-limit" in keys:
        raise ConfigError("%s: and zram-resident-limit both set; accepted: "
                          "one of them" % where("mem-limit"))
    mem_limit = get("mem-limit", parse_size, 0)
    resident_mib = mib("zram-resident-limit", 0)
    if resident_mib:
        mem_limit = int(resident_mib * MiB)
    writeback_device = get("writeback-device", _parse_absolute_path, None)
    dev = DeviceConfig(name=name, size=size, size_expr=size_expr,
                       algorithm=algorithm, level=level, dict_path=dict_path,
                       swap_priority=priority, fs_type=fs_type,
                       mount_point=mount_point, options=options,
                       mem_limit=mem_limit, writeback_device=writeback_device,
                       sources=sources)
    if dev.size > 0:
        _check_with_plugin(dev, keys, where)
    return dev


#: The plugin parameter each zramd.conf key becomes.
_PLUGIN_KEY_SOURCE = {"size": "zram-size",
                      "algorithm": "compression-algorithm",
                      "level": "compression-algorithm",
                      "dict": "compression-algorithm",
                      "mem_limit": "mem-limit"}


def _check_with_plugin(dev, keys, where):
    """Refuse now what the server would refuse at start-up (a level the
    algorithm does not take, an unreadable dictionary, a size too large),
    through the plugin's own parameter checks, so that the generator
    enables nothing for a bad file."""
    try:
        from zramd.params import ParamParser
    except ImportError as e:
        raise ConfigError("[%s]: cannot check the device with the plugin's "
                          "parameters: %s" % (dev.name, e)) from None
    parser = ParamParser()
    try:
        for param in dev.plugin_params():
            key, _, value = param.partition("=")
            if key == "backing_dev":
                continue     # may not exist yet when the generator runs
            parser.set(key, value)
        parser.set("name", dev.name)
        parser.complete(check_control=False)
    except ConfigError as e:
        plugin_key = e.message.partition(":")[0]
        key = _PLUGIN_KEY_SOURCE.get(plugin_key, "compression-algorithm")
        if key == "mem-limit" and "zram-resident-limit" in keys:
            key = "zram-resident-limit"     # the one the file sets
        place = where(key) if key in keys else "[%s] %s" % (dev.name, key)
        raise ConfigError("%s: %s" % (place, e.message)) from None


def algorithms():
    """The accepted algorithm names (zramd.compress's table if present)."""
    try:
        from zramd import compress
        return tuple(compress.names())
    except Exception:        # the registry not importable: the plugin's list
        return KNOWN_ALGORITHMS


_ALGO_RE = re.compile(r"^([A-Za-z0-9_-]+)\s*(?:\((.*)\))?$")


def parse_algorithm(value):
    """``zstd``, ``zstd(level=3)``, ``zstd(level=3, dict=/path)`` ->
    ``(name, level or None, dict path or None)``."""
    m = _ALGO_RE.match(value.strip())
    if not m:
        raise ConfigError("%r: expected NAME or NAME(level=N, dict=PATH)"
                          % value)
    name, params = m.group(1), m.group(2)
    accepted = algorithms()
    if name not in accepted:
        raise ConfigError("unknown algorithm %r (accepted: %s)"
                          % (name, ", ".join(accepted)))
    level = dict_path = None
    items = params.split(",") if params and params.strip() else []
    for item in items:
        item = item.strip()
        if not item:
            raise ConfigError("%r: empty parameter" % value)
        k, sep, v = (s.strip() for s in item.partition("="))
        if not sep or not v:
            raise ConfigError("%r: expected key=value, got %r" % (value, item))
        if k == "level":
            try:
                level = int(v)
            except ValueError:
                raise ConfigError("level %r is not an integer" % v) from None
        elif k == "dict":
            if not os.path.isabs(v):
                raise ConfigError("dict %r is not an absolute path" % v)
            dict_path = v
        else:
            raise ConfigError("unknown parameter %r (accepted: level, dict)"
                              % k)
    return name, level, dict_path


def _parse_priority(value):
    try:
        prio = int(value)
    except ValueError:
        prio = None
    if prio is None or not -1 <= prio <= 32767:
        raise ConfigError("%r: expected an integer from -1 to 32767" % value)
    return prio


_FS_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def _parse_fs_type(value):
    if not _FS_RE.match(value):
        raise ConfigError("%r: expected 'swap' or a file system type such as "
                          "ext4" % value)
    return value


def _parse_mount_point(value):
    norm = os.path.normpath(_parse_absolute_path(value))
    return norm if norm != "//" else "/"


def _parse_absolute_path(value):
    if not os.path.isabs(value):
        raise ConfigError("%r is not an absolute path" % value)
    return value


def _parse_host_memory_limit(value):
    """``none`` or whole MiB, as zram-generator takes it."""
    if value == "none":
        return None
    if not value.isdigit():
        raise ConfigError("%r: expected 'none' or whole MiB" % value)
    return int(value)


def _parse_options(value):
    if any(c.isspace() for c in value):
        raise ConfigError("%r: expected a comma-separated list without "
                          "spaces" % value)
    return value


_SIZE_RE = re.compile(r"^(\d+)\s*([KMGT]?)(?:i?B)?$", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def parse_size(value):
    """``0``, ``4096``, ``512M``, ``2G``, ``1GiB`` -> bytes (binary units)."""
    m = _SIZE_RE.match(value.strip())
    if not m:
        raise ConfigError("%r: expected bytes with an optional K, M, G or T "
                          "suffix" % value)
    return int(m.group(1)) << _SIZE_SHIFT[m.group(2).upper()]


# ---------------------------------------------------------------------------
# The zram-size evaluator

def _pow(a, b):
    try:
        return math.pow(a, b)
    except (OverflowError, ValueError) as e:
        raise ConfigError("%g ^ %g: %s" % (a, b, e)) from None


def _div(a, b):
    if b == 0:
        raise ConfigError("division by zero")
    return a / b


def _mod(a, b):
    if b == 0:
        raise ConfigError("modulo by zero")
    return math.fmod(a, b)


def _log(*args):
    # fasteval's log: log(x) is base 10, log(base, x).
    if len(args) == 1:
        base, x = 10.0, args[0]
    elif len(args) == 2:
        base, x = args
    else:
        raise ConfigError("log takes 1 or 2 arguments")
    try:
        return math.log(x, base)
    except (ValueError, ZeroDivisionError) as e:
        raise ConfigError("log: %s" % e) from None


def _sqrt(x):
    if x < 0:
        raise ConfigError("sqrt of a negative number")
    return math.sqrt(x)


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub,
           ast.Mult: operator.mul, ast.Div: _div, ast.Mod: _mod,
           ast.Pow: _pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {
    "min": (min, 1, None), "max": (max, 1, None), "abs": (abs, 1, 1),
    "int": (math.trunc, 1, 1), "round": (round, 1, 1),
    "ceil": (math.ceil, 1, 1), "floor": (math.floor, 1, 1),
    "sqrt": (_sqrt, 1, 1), "log": (_log, 1, 2),
}
_CONSTANTS = {"e": math.e, "pi": math.pi}
MAX_EXPRESSION = 1000


def evaluate(expr, variables):
    """Evaluate an arithmetic expression with ``variables`` (name -> number).

    Returns a finite float.  Anything outside the small grammar above (an
    attribute, a string, an unknown name or function, keyword arguments) is
    a ConfigError, as are division by zero and overflow.
    """
    if len(expr) > MAX_EXPRESSION:
        raise ConfigError("expression longer than %d characters"
                          % MAX_EXPRESSION)
    try:
        # '^' is the power operator, as in zram-generator (fasteval); as
        # '**' it keeps the precedence of a power.  No string literal can
        # appear, so the replacement is safe.
        tree = ast.parse(expr.strip().replace("^", "**"), mode="eval")
    except SyntaxError as e:
        raise ConfigError("%r: syntax error at column %s"
                          % (expr, e.offset)) from None
    names = dict(_CONSTANTS)
    names.update(variables)
    try:
        value = _eval(tree.body, names, expr)
    except ConfigError as e:
        if e.message.startswith(repr(expr)):
            raise
        raise ConfigError("%r: %s" % (expr, e.message)) from None
    if not math.isfinite(value):
        raise ConfigError("%r: result is not finite" % expr)
    return float(value)


def _eval(node, names, expr):
    if isinstance(node, ast.Constant):
        if type(node.value) in (int, float):
            return float(node.value)
        raise ConfigError("%r: %r is not a number" % (expr, node.value))
    if isinstance(node, ast.Name):
        if node.id in names:
            return float(names[node.id])
        raise ConfigError("%r: unknown name %r (accepted: %s)"
                          % (expr, node.id, ", ".join(sorted(names))))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a = _eval(node.left, names, expr)
        b = _eval(node.right, names, expr)
        return float(_BINARY[type(node.op)](a, b))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand, names, expr))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        fname = node.func.id
        if fname not in _FUNCTIONS:
            raise ConfigError("%r: unknown function %r (accepted: %s)"
                              % (expr, fname, ", ".join(sorted(_FUNCTIONS))))
        func, lo, hi = _FUNCTIONS[fname]
        if node.keywords or any(isinstance(a, ast.Starred)
                                for a in node.args):
            raise ConfigError("%r: %s takes plain arguments" % (expr, fname))
        if len(node.args) < lo or (hi is not None and len(node.args) > hi):
            raise ConfigError("%r: %s takes %s argument(s), got %d"
                              % (expr, fname,
                                 lo if hi == lo else "%d or more" % lo
                                 if hi is None else "%d to %d" % (lo, hi),
                                 len(node.args)))
        args = [_eval(a, names, expr) for a in node.args]
        try:
            return float(func(*args))
        except (OverflowError, ValueError) as e:
            raise ConfigError("%r: %s: %s" % (expr, fname, e)) from None
    raise ConfigError("%r: unsupported syntax %r (numbers, ram, + - * / %% ^, "
                      "parentheses and %s only)"
                      % (expr, type(node).__name__, ", ".join(_FUNCTIONS)))
