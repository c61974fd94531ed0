"""zramd.conf: which devices ``zramd up`` and the systemd units bring up.

The format and the search rules follow zram-generator.conf(5), whose keys
and directive it takes.  Each device is one section named for it; every
key is optional::

    set!hotplug = cat /etc/hotplug-max    # global: VAR = a program's output

    [zramd0]
    zram-size = min(ram / 2, 4096)        # MiB, an expression of ram (MiB)
    compression-algorithm = lz4 zstd(level=9) (type=idle)
    swap-priority = 100                   # swap devices only
    fs-type = swap                        # or ext4, ext2, xfs, ...
    mount-point = /var/compressed         # file-system devices only
    fs-create-options = -L scratch        # mkfs words, file systems only
    options = discard                     # swapon -o / mount -o
    mem-limit = 1G                        # cap on the pool (0: none)
    zram-resident-limit = hotplug / 8     # the same cap, in MiB
    host-memory-limit = 9048              # MiB: no device on more RAM
    writeback-device = /dev/sdb2          # backing_dev for writeback

``compression-algorithm`` is the algorithm, then up to three
recompression algorithms (the plugin's ``recomp_algorithm``, priority 1,
2, 3), then a group without a name, the global recompression parameters,
which become the plugin's policy (``policy_recompress``,
``policy_max_pages``, every RECOMPRESS_INTERVAL seconds).  zram-generator's
obsolete keys (``memory-limit``, ``zram-fraction``, ``max-zram-size``) are
taken with a warning naming their replacement.

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
next line, a value in quotes (they are dropped), and an empty value
(``key =``) that resets the key to its default (but ``options =`` means no
options, as in zram-generator).  Anything else or a bad value is a
:class:`~zramd.errors.ConfigError` naming the file, line, section and key;
:func:`load` either returns the whole configuration or raises, so a bad file
changes nothing.  An unknown key is refused too, or, as zram-generator
does, reported and ignored (``unknown_keys="warn"``: the generator).

``set!VAR = program`` lines of the global section (before any header) run
``/bin/sh -c program`` when the configuration is read, in reading order,
each for at most SET_TIMEOUT seconds; its output, an expression, becomes
VAR for the later ``set!`` lines and every file's ``zram-size`` and
``zram-resident-limit``, which are evaluated once all files are read.

Expressions are evaluated by a small arithmetic evaluator over Python's
``ast`` (never ``eval``), in fasteval's language as zram-generator uses
it: numbers with optional SI suffixes, ``ram`` (MemTotal in MiB, read
from ``ROOT/proc/meminfo``), the ``set!`` variables, ``e``, ``pi``, ``+ -
* / %``, ``^`` and ``**`` for powers, parentheses, and the functions in
_FUNCTIONS.  A device whose size works out as 0 is not brought up, as in
zram-generator.
"""

import ast
import dataclasses
import math
import operator
import os
import re
import shlex
import signal
import subprocess
import sys

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
KNOWN_ALGORITHMS = ("lz4", "lz4hc", "zstd", "deflate", "lzo-rle", "lzo")

KEYS = ("zram-size", "compression-algorithm", "swap-priority", "fs-type",
        "mount-point", "options", "fs-create-options", "mem-limit",
        "zram-resident-limit", "host-memory-limit", "writeback-device")

#: zram-generator's obsolete keys, still accepted with a warning, and what
#: replaces each.  memory-limit is host-memory-limit under its old name (not
#: zramd's mem-limit); the other two override zram-size.
OBSOLETE_KEYS = {"memory-limit": "host-memory-limit",
                 "zram-fraction": "zram-size",
                 "max-zram-size": "zram-size"}

#: ``load(unknown_keys=...)``: "error" refuses a file with an unknown key
#: (``zramd up``), "warn" reports it and ignores the setting, as
#: zram-generator does (the generator, and the units it enables, through
#: this variable in their environment).
UNKNOWN_KEYS_ENV = "ZRAMD_UNKNOWN_KEYS"
UNKNOWN_KEYS_MODES = ("error", "warn")

#: The one directive of the global section: ``set!VAR = program``.
SET_DIRECTIVE = "set!"
#: Most seconds a ``set!`` program may run.  systemd gives all generators
#: together 90 s at boot; a program that hangs must not take them all.
SET_TIMEOUT = 10
_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

#: Global recompression parameters (``compression-algorithm = lz4 zstd
#: (type=idle)``) become zramd's post-processing policy, which needs a
#: period; zram's own ``type=idle`` acts once, on what the last idle
#: marking selected.  Every ten minutes, on pages idle for
#: policy_idle_age (an hour by default), each pass has little to do.
RECOMPRESS_INTERVAL = 600
#: zram's recompression priorities, 1..3 (ZRAM_MAX_COMPS - 1).
MAX_RECOMP = 3
#: zram-generator warns of a device more than this many times the RAM.
IMPROBABLE_RATIO = 32

#: A device name is used in file names and systemd instance names.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

#: zram_defs.h's PAGE_SIZE, written out: the generator imports this
#: module at boot without the C extension (zramd/__init__.py);
#: tests/test_config.py checks that the two agree.
PAGE_SIZE = 4096
MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """One configured device, every value checked.

    ``size`` and ``mem_limit`` are bytes (``size`` a multiple of 4096;
    ``mem_limit`` 0 for none).  ``fs_type`` is ``"swap"`` or a file system
    type; ``mount_point`` is None for swap; ``fs_create_options`` the
    words mkfs takes before the device.  ``recomp_algorithms`` are the
    recompression algorithms of priority 1, 2, ... as ``(name, level or
    None)``; ``recompress_type`` and ``recompress_max_pages`` the global
    recompression parameters, run by the plugin's policy.  ``sources``
    lists the files that set any key, in reading order.
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
    fs_create_options: tuple = ()
    recomp_algorithms: tuple = ()
    recompress_type: str | None = None
    recompress_max_pages: int = 0
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
        if self.recomp_algorithms:
            params.append("recomp_algorithm=" + ",".join(
                "algo=%s priority=%d" % (name, prio)
                + ("" if level is None else " level=%d" % level)
                for prio, (name, level) in enumerate(self.recomp_algorithms,
                                                     1)))
        if self.recompress_type is not None:
            params += ["policy_interval=%d" % RECOMPRESS_INTERVAL,
                       "policy_recompress=%s" % self.recompress_type]
            if self.recompress_max_pages:
                params.append("policy_max_pages=%d"
                              % self.recompress_max_pages)
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


def parse_file(path, unknown_keys="error", warn=None):
    """Parse one file into ``[(section, key, value, lineno)]``; a section
    header is an entry with key and value None, so ``[zramd0]`` alone
    defines a device with every default, and a ``set!VAR`` directive of
    the global section (before any header) has section None.  A value in
    matching single or double quotes loses them, as zram-generator's ini
    reader takes it.

    Raises ConfigError naming the file and line for a syntax error.  An
    unknown key, a setting outside a section or a bad section name is
    refused too, or, with ``unknown_keys="warn"``, passed to ``warn`` and
    left out (a bad section with all its settings).
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("%s: cannot read: %s" % (path, e)) from None
    lenient = unknown_keys == "warn"

    def refuse(lineno, message):
        message = "%s:%d: %s" % (path, lineno, message)
        if not lenient:
            raise ConfigError(message)
        (warn or _warn_stderr)(message + ", ignored")

    entries = []
    section = None
    skipping = False        # in a section refused with a warning
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
            skipping = not NAME_RE.match(section)
            if skipping:
                refuse(lineno, "[%s]: bad device name (letters, digits, "
                       "'_', '.', '-', at most 64, not starting with a "
                       "punctuation mark)" % section)
                continue
            entries.append((section, None, None, lineno))
            continue
        if "=" not in line:
            raise ConfigError("%s:%d: expected 'key = value' or '[section]', "
                              "got %r" % (path, lineno, line))
        key, value = (s.strip() for s in line.split("=", 1))
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if skipping:
            continue
        if section is None:
            if key.startswith(SET_DIRECTIVE):
                var = key[len(SET_DIRECTIVE):]
                if not _VAR_RE.match(var) or var in _RESERVED_NAMES:
                    raise ConfigError(
                        "%s:%d: %s: bad variable name %r (letters, digits "
                        "and '_', not starting with a digit; not ram nor a "
                        "constant or function of the expressions)"
                        % (path, lineno, key, var))
                entries.append((None, key, value, lineno))
            elif "!" in key:
                refuse(lineno, "%s: unknown directive (accepted: "
                       "set!VARIABLE = program)" % key)
            else:
                refuse(lineno, "%s: setting outside of a [device] section"
                       % key)
            continue
        if key not in KEYS and key not in OBSOLETE_KEYS:
            refuse(lineno, "[%s] %s: unknown key (accepted: %s)"
                   % (section, key, ", ".join(KEYS)))
            continue
        entries.append((section, key, value, lineno))
    return entries


def _warn_stderr(message):
    print("zramd: warning: %s" % message, file=sys.stderr, flush=True)


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


def load(root="/", ram_mib=None, unknown_keys=None, warn=None):
    """Read the whole configuration under ``root``.

    Returns ``{name: DeviceConfig}`` in the order devices first appear,
    leaving out devices whose size is 0 and those whose host-memory-limit
    is below the machine's RAM.  ``ram_mib`` overrides MemTotal.
    ``unknown_keys`` is "error" (refuse the configuration) or "warn"
    (ignore the setting); None takes $ZRAMD_UNKNOWN_KEYS, else "error".
    Warnings (obsolete keys, and unknown ones with "warn") go to ``warn``,
    a function of one line, by default stderr.  ``set!`` programs run
    here, in the order read, each for at most SET_TIMEOUT seconds.
    Raises ConfigError (file, line, section and key) and nothing else.
    """
    if unknown_keys is None:
        unknown_keys = os.environ.get(UNKNOWN_KEYS_ENV) or "error"
    if unknown_keys not in UNKNOWN_KEYS_MODES:
        raise ConfigError("%s: %r; accepted: %s" % (
            UNKNOWN_KEYS_ENV, unknown_keys, " ".join(UNKNOWN_KEYS_MODES)))
    warn = warn or _warn_stderr
    raw = {}             # name -> {key: (value, path, lineno, spelled)}
    sources = {}
    directives = []      # (key, program, path, lineno)
    for path in config_files(root):
        for section, key, value, lineno in parse_file(path, unknown_keys,
                                                      warn):
            if section is None:
                directives.append((key, value, path, lineno))
                continue
            keys = raw.setdefault(section, {})
            if key is None:
                pass
            elif value or key == "options":   # 'options =': none at all
                canonical = "host-memory-limit" if key == "memory-limit" \
                    else key
                keys[canonical] = (value, path, lineno, key)
            else:                    # 'key =' resets it, as in systemd
                keys.pop("host-memory-limit" if key == "memory-limit"
                         else key, None)
            srcs = sources.setdefault(section, [])
            if path not in srcs:
                srcs.append(path)
    if not raw and not directives:
        return {}
    if ram_mib is None:
        ram_mib = mem_total_mib(root)
    variables = {"ram": ram_mib}
    for key, program, path, lineno in directives:
        variables[key[len(SET_DIRECTIVE):]] = _run_set(
            "%s:%d: %s" % (path, lineno, key), program, variables)
    devices = {}
    for name, keys in raw.items():
        dev = _device(name, keys, variables, tuple(sources[name]), warn)
        if dev is not None and dev.size > 0:
            devices[name] = dev
    return devices


def _run_set(where, program, variables):
    """Run ``program`` with ``/bin/sh -c``, as system(3) does, and evaluate
    what it prints as an expression of ``variables``.  ConfigError starting
    with ``where`` if it cannot run, runs longer than SET_TIMEOUT (it is
    killed, with its process group), exits other than 0, or prints nothing
    that evaluates to a number."""
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", "--", program],
                                stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE,
                                start_new_session=True)
    except OSError as e:
        raise ConfigError("%s: cannot run /bin/sh: %s" % (where, e)) from None
    try:
        out, err = proc.communicate(timeout=SET_TIMEOUT)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        # Not communicate(): a child that left the process group may hold
        # the pipes open for as long as it likes.
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        raise ConfigError("%s: %r did not finish in %d seconds; killed"
                          % (where, program, SET_TIMEOUT)) from None
    detail = err.decode(errors="replace").strip().splitlines()
    detail = ": " + detail[-1] if detail else ""
    if proc.returncode:
        status = ("exit %d" % proc.returncode if proc.returncode > 0
                  else "signal %d" % -proc.returncode)
        raise ConfigError("%s: %r failed (%s)%s" % (where, program, status,
                                                   detail))
    try:
        text = out.decode().strip()
    except UnicodeDecodeError:
        raise ConfigError("%s: %r printed bytes that are not UTF-8"
                          % (where, program)) from None
    if not text:
        raise ConfigError("%s: %r printed nothing; expected a number or an "
                          "expression" % (where, program))
    try:
        return evaluate(text, variables)
    except ConfigError as e:
        raise ConfigError("%s: %r printed %s" % (where, program, e.message)
                          ) from None


# ---------------------------------------------------------------------------
# Values

def _device(name, keys, variables, sources, warn):
    ram_mib = variables["ram"]

    def where(key):
        _, path, lineno, spelled = keys[key]
        return "%s:%d: [%s] %s" % (path, lineno, name, spelled)

    def get(key, parse, default):
        if key not in keys:
            return default
        try:
            return parse(keys[key][0])
        except ConfigError as e:
            raise ConfigError("%s: %s" % (where(key), e.message)) from None

    def mib(key, default):
        """An expression of ``ram`` and the set! variables in MiB
        (zram-size and zram-resident-limit), never negative."""
        value = get(key, lambda v: evaluate(v, variables), default)
        if value < 0:
            raise ConfigError("%s: %r is negative (%g MiB)"
                              % (where(key), keys[key][0], value))
        return value

    for key in ("host-memory-limit", "zram-fraction", "max-zram-size"):
        spelled = keys[key][3] if key in keys else None
        if spelled in OBSOLETE_KEYS:
            warn("%s: obsolete, use %s instead" % (where(key),
                                                    OBSOLETE_KEYS[spelled]))
    host_limit = get("host-memory-limit", _parse_host_memory_limit, None)
    if host_limit is not None and ram_mib > host_limit:
        return None          # more RAM than the limit: zram-generator skips
    if "zram-fraction" in keys or "max-zram-size" in keys:
        # zram-generator's old sizing, which overrides zram-size:
        # min(int(fraction * ram), max) MiB, fraction 0.5 and no maximum
        # by default.
        fraction = get("zram-fraction", _parse_fraction, 0.5)
        most = get("max-zram-size", _parse_host_memory_limit, None)
        size_expr = "int(ram * %r)" % fraction
        size_mib = math.trunc(ram_mib * fraction)
        if most is not None:
            size_expr = "min(%s, %d)" % (size_expr, most)
            size_mib = min(size_mib, most)
        if "zram-size" in keys:
            warn("%s: overridden by the obsolete %s" % (
                where("zram-size"), " and ".join(
                    k for k in ("zram-fraction", "max-zram-size")
                    if k in keys)))
    else:
        size_expr = keys["zram-size"][0] if "zram-size" in keys \
            else DEFAULT_SIZE
        size_mib = mib("zram-size", evaluate(DEFAULT_SIZE, variables))
    size = int(size_mib * MiB) // PAGE_SIZE * PAGE_SIZE
    if ram_mib and size // (ram_mib * MiB) > IMPROBABLE_RATIO:
        # zram-generator's warning; SI suffixes make it easy: 4G is 4e9.
        warn("%s: %s = %d bytes would need an improbable compression ratio "
             "of %d with %d MiB of RAM; units may be wrong (a size is in "
             "MiB, and G is 1e9)" % (
                 where("zram-size") if "zram-size" in keys
                 else "[%s] zram-size" % name, size_expr, size,
                 size // (ram_mib * MiB), ram_mib))

    algos = get("compression-algorithm", parse_algorithms,
                Algorithms((DEFAULT_ALGORITHM, None, None)))
    algorithm, level, dict_path = algos.primary
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
    fs_create_options = get("fs-create-options", _parse_words, ())
    if fs_create_options and fs_type == "swap":
        raise ConfigError("%s: a swap device is made by mkswap, not mkfs; "
                          "accepted with mount-point" % where(
                              "fs-create-options"))
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
                       fs_create_options=fs_create_options,
                       recomp_algorithms=algos.recompress,
                       recompress_type=algos.recompress_type,
                       recompress_max_pages=algos.recompress_max_pages,
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
        # A size too large for the RAM is the server's to refuse when it
        # starts; here it is only warned of, as zram-generator does.
        parser.complete(check_control=False, check_memory=False)
    except ConfigError as e:
        plugin_key = e.message.partition(":")[0]
        key = _PLUGIN_KEY_SOURCE.get(plugin_key, "compression-algorithm")
        if key == "zram-size" and key not in keys:
            key = ("zram-fraction" if "zram-fraction" in keys
                   else "max-zram-size")
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


_ALGO_RE = re.compile(r"([A-Za-z0-9_-]*)(?:\(([^()]*)\))?")
_ALGO_FORMS = ("NAME, NAME(level=N, dict=PATH), then recompression "
               "algorithms NAME(level=N) and (type=TYPE, max_pages=N)")
#: The kernel's recompress types zramd's policy takes.
RECOMPRESS_TYPES = ("idle", "huge", "huge_idle")


@dataclasses.dataclass(frozen=True)
class Algorithms:
    """A compression-algorithm value: ``primary`` is ``(name, level or
    None, dict path or None)``; ``recompress`` the recompression
    algorithms by priority, ``((name, level or None), ...)``; then the
    global recompression parameters."""

    primary: tuple
    recompress: tuple = ()
    recompress_type: str | None = None
    recompress_max_pages: int = 0


def _algorithm_tokens(value):
    """Split a compression-algorithm value at whitespace into ``(name,
    params or None)``; a space inside parentheses does not split, a space
    before them does (``zstd (level=3)`` is zstd, then a group without a
    name), as zram-generator reads it."""
    tokens = []
    pos = 0
    value = value.strip()
    while pos < len(value):
        m = _ALGO_RE.match(value, pos)
        end = m.end()
        if end == pos or (end < len(value) and not value[end].isspace()):
            raise ConfigError("%r: expected %s" % (value, _ALGO_FORMS))
        tokens.append((m.group(1), m.group(2)))
        pos = end
        while pos < len(value) and value[pos].isspace():
            pos += 1
    if not tokens:
        raise ConfigError("%r: expected %s" % (value, _ALGO_FORMS))
    return tokens


def _algorithm_params(value, params, accepted):
    """``level=3, dict=/x`` -> ``{"level": "3", "dict": "/x"}``, each key
    one of ``accepted``."""
    out = {}
    items = params.split(",") if params and params.strip() else []
    for item in items:
        item = item.strip()
        if not item:
            raise ConfigError("%r: empty parameter" % value)
        k, sep, v = (s.strip() for s in item.partition("="))
        if not sep or not v:
            raise ConfigError("%r: expected key=value, got %r" % (value, item))
        if k not in accepted:
            raise ConfigError("unknown parameter %r (accepted: %s)"
                              % (k, ", ".join(accepted)))
        out[k] = v
    return out


def _known(name):
    accepted = algorithms()
    if name not in accepted:
        raise ConfigError("unknown algorithm %r (accepted: %s)"
                          % (name, ", ".join(accepted)))
    return name


def _level(params):
    if "level" not in params:
        return None
    try:
        return int(params["level"])
    except ValueError:
        raise ConfigError("level %r is not an integer"
                          % params["level"]) from None


def parse_algorithm(value):
    """``zstd``, ``zstd(level=3)``, ``zstd(level=3, dict=/path)`` ->
    ``(name, level or None, dict path or None)``."""
    tokens = _algorithm_tokens(value)
    name, params = tokens[0]
    if len(tokens) != 1 or not name:
        raise ConfigError("%r: expected NAME or NAME(level=N, dict=PATH)"
                          % value)
    _known(name)
    params = _algorithm_params(value, params, ("level", "dict"))
    dict_path = params.get("dict")
    if dict_path is not None and not os.path.isabs(dict_path):
        raise ConfigError("dict %r is not an absolute path" % dict_path)
    return name, _level(params), dict_path


def parse_algorithms(value):
    """zram-generator's compression-algorithm list -> Algorithms.

    ``lz4 zstd(level=9) deflate (type=idle, max_pages=1000)``: the first
    name is the algorithm, the following ones recompression algorithms of
    priority 1, 2, 3 (with a level), and a group without a name the global
    recompression parameters, which zramd's policy applies every
    RECOMPRESS_INTERVAL seconds.  Raises ConfigError for anything else."""
    tokens = _algorithm_tokens(value)
    primary = None
    recompress = []
    group = None
    for name, params in tokens:
        if not name:
            if group is not None:
                raise ConfigError("%r: two groups of global recompression "
                                  "parameters; accepted: one" % value)
            try:
                group = _algorithm_params(value, params,
                                          ("type", "max_pages"))
            except ConfigError as e:
                raise ConfigError(
                    "(%s): %s for the global recompression parameters; a "
                    "parameter of an algorithm follows its name without a "
                    "space, NAME(level=N)" % (params, e.message)) from None
        elif primary is None:
            primary = parse_algorithm(name if params is None
                                      else "%s(%s)" % (name, params))
        else:
            _known(name)
            try:
                p = _algorithm_params(value, params, ("level",))
            except ConfigError as e:
                raise ConfigError("%s: %s for a recompression algorithm"
                                  % (name, e.message)) from None
            recompress.append((name, _level(p)))
    if primary is None:
        raise ConfigError("%r: no algorithm; expected %s"
                          % (value, _ALGO_FORMS))
    if len(recompress) > MAX_RECOMP:
        raise ConfigError("%r: %d recompression algorithms; accepted: at "
                          "most %d (zram's priorities 1..%d)"
                          % (value, len(recompress), MAX_RECOMP, MAX_RECOMP))
    rtype, max_pages = None, 0
    if group is not None:
        if not recompress:
            raise ConfigError("%r: global recompression parameters without "
                              "a recompression algorithm; accepted: NAME "
                              "NAME2 (type=TYPE)" % value)
        rtype = group.get("type")
        if rtype is None:
            raise ConfigError("%r: type= missing in the global "
                              "recompression parameters; accepted: %s"
                              % (value, " ".join(RECOMPRESS_TYPES)))
        if rtype not in RECOMPRESS_TYPES:
            raise ConfigError("type %r; accepted: %s"
                              % (rtype, " ".join(RECOMPRESS_TYPES)))
        if "max_pages" in group:
            text = group["max_pages"]
            if not text.isdigit() or int(text) == 0:
                raise ConfigError("max_pages %r; accepted: a number of "
                                  "pages > 0" % text)
            max_pages = int(text)
    return Algorithms(primary, tuple(recompress), rtype, max_pages)


def _parse_words(value):
    """Words as the shell splits them (quotes, backslashes)."""
    try:
        return tuple(shlex.split(value))
    except ValueError as e:
        raise ConfigError("%r: %s" % (value, e)) from None


def _parse_fraction(value):
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not (math.isfinite(fraction) and fraction >= 0):
        raise ConfigError("%r: expected a number >= 0" % value)
    return fraction


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
def _round(*args):
    # fasteval's round([modulus, ] x): to a multiple of modulus (1 if not
    # given), halves away from zero as Rust's f64::round.
    modulus, x = (1.0,) + args if len(args) == 1 else args
    q = _div(x, modulus)
    return math.copysign(math.floor(abs(q) + 0.5), q) * modulus


def _sign(x):
    return math.copysign(1.0, x)


_FUNCTIONS = {
    "min": (min, 1, None), "max": (max, 1, None), "abs": (abs, 1, 1),
    "int": (math.trunc, 1, 1), "round": (_round, 1, 2),
    "ceil": (math.ceil, 1, 1), "floor": (math.floor, 1, 1),
    "sqrt": (_sqrt, 1, 1), "log": (_log, 1, 2), "sign": (_sign, 1, 1),
    # fasteval's constants are functions: e(), pi().
    "e": (lambda: math.e, 0, 0), "pi": (lambda: math.pi, 0, 0),
}
# fasteval's trigonometric functions, in radians.
_FUNCTIONS.update((name, (getattr(math, name), 1, 1)) for name in (
    "sin", "cos", "tan", "asin", "acos", "atan",
    "sinh", "cosh", "tanh", "asinh", "acosh", "atanh"))
_CONSTANTS = {"e": math.e, "pi": math.pi}
MAX_EXPRESSION = 1000
#: Names a set! directive may not take: the evaluator's own.
_RESERVED_NAMES = frozenset({"ram"} | set(_CONSTANTS) | set(_FUNCTIONS))

# fasteval's SI suffixes on a number without an exponent: 2G is 2e9 and
# 500k 5e5 (decimal, as in zram-generator: 2G MiB of zram-size is not
# 2 GiB).
_SI_SUFFIX = {"k": 3, "K": 3, "M": 6, "G": 9, "T": 12, "m": -3, "u": -6,
              "\u00b5": -6, "n": -9, "p": -12}
_SI_RE = re.compile(r"(?<![\w.])(\d+\.?\d*|\.\d+)([kKMGTmunp\u00b5])(?!\w)")


def _si(expr):
    return _SI_RE.sub(lambda m: "%se%d" % (m.group(1),
                                           _SI_SUFFIX[m.group(2)]), expr)


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
        tree = ast.parse(_si(expr.strip()).replace("^", "**"), mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as e:
        where = (" at column %s" % e.offset
                 if isinstance(e, SyntaxError) else ": nested too deeply")
        raise ConfigError("%r: syntax error%s" % (expr, where)) from None
    names = dict(_CONSTANTS)
    names.update(variables)
    try:
        value = _eval(tree.body, names, expr)
    except ConfigError as e:
        if e.message.startswith(repr(expr)):
            raise
        raise ConfigError("%r: %s" % (expr, e.message)) from None
    except RecursionError:
        raise ConfigError("%r: nested too deeply" % expr) from None
    except (ArithmeticError, ValueError) as e:
        # A number too large for a float, a math domain error: whatever
        # the operators above did not catch themselves.
        raise ConfigError("%r: %s" % (expr, e)) from None
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
