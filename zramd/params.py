"""The plugin's ``key=value`` parameters: parsing, validation, and help.

nbdkit hands ``plugin.py`` one ``config(key, value)`` call per argument and
then ``config_complete()``.  ``ParamParser`` mirrors that: ``set()`` checks a
key and the form of its value at once, ``complete()`` checks what needs all
of them (the required ``size``; the compressor with its level and
dictionary, built once and thrown away) and returns a frozen ``Params``.
Nothing here starts a thread or allocates the disk: the device is built
after nbdkit forks.

Every failure is a ``ConfigError`` whose message begins with the key and
says what is accepted, so that nbdkit refuses to start with one line such
as ``size: '1Q' is not a size; use a number of bytes with an optional
suffix ...``.

Sizes follow ``nbdkit_parse_size()`` exactly (nbdkit-plugin(3)): a decimal
number with at most one suffix, ``b`` (bytes), ``k`` ``m`` ``g`` ``t`` ``p``
``e`` (powers of 1024, either case) or ``s`` (512-byte sectors).  We parse
them in Python, not with ``nbdkit.parse_size``, so that the rules can be
tested without nbdkit and the message can name the key.
"""

import dataclasses
import os
import re
import socket

from zramd import PAGE_SIZE, compress, paths
from zramd.device import PP_TYPES, RECOMPRESS_TYPES
from zramd.errors import ConfigError

# (key, placeholder, description): drives config_help, dump_plugin and the
# README's parameter table; the order is the order users read them in.
PARAMETERS = (
    ("size", "SIZE", "(required) disk size: bytes, or a number with an "
     "nbdkit size suffix (512M, 1G); a multiple of 4096"),
    ("algorithm", "NAME", "compression algorithm (default lz4)"),
    ("level", "N", "compression level (default: the algorithm's own)"),
    ("dict", "FILE", "zstd dictionary file"),
    ("mem_limit", "SIZE", "most memory the pool may use, like size; "
     "0 = no limit (default)"),
    ("chain_size", "N", "most frames in one zspage, 4..16 (default 8)"),
    ("name", "NAME", "device name for the control socket and zramd "
     "(default zramd0)"),
    ("control", "PATH", "control socket (default "
     "$ZRAMD_RUNTIME_DIR/NAME.sock, else /run/zramd/NAME.sock)"),
    ("swap", "BOOL", "the disk backs swap: keep every page the server "
     "touches resident (mlockall on fault) and mark it an IO flusher "
     "(default false)"),
    ("backing_dev", "FILE", "file (ours, mode 0600) or block device for "
     "writeback, by absolute path; none: no backing device (default)"),
    ("recomp_algorithm", "SPECS", "secondary algorithms, comma-separated: "
     "NAME or 'algo=NAME priority=1..3 level=N' (priority: position)"),
    ("policy_interval", "SECONDS", "run idle marking, recompression and "
     "writeback every SECONDS (default 0: never)"),
    ("policy_idle_age", "SECONDS", "pages not accessed for this long are "
     "idle (default 3600)"),
    ("policy_recompress", "TYPE", "idle|huge|huge_idle: what the policy "
     "recompresses (default: nothing; needs recomp_algorithm)"),
    ("policy_writeback", "TYPE", "idle|huge|huge_idle|incompressible: what "
     "the policy writes back (default: nothing; needs backing_dev)"),
    ("policy_max_pages", "N", "most pages per policy step (default 0: all)"),
)
# Every policy_* key but policy_interval is refused without it: alone,
# the policy never runs (_check_policy).

KEYS = tuple(key for key, _, _ in PARAMETERS)

DEFAULT_ALGORITHM = "lz4"
DEFAULT_NAME = "zramd0"
DEFAULT_CHAIN_SIZE = 8
CHAIN_SIZE_MIN, CHAIN_SIZE_MAX = 4, 16

# nbdkit_parse_size(): strtoimax() then one suffix character.
_SIZE_RE = re.compile(r"[ \t\n\v\f\r]*([+-]?)([0-9]+)([bBkKmMgGtTpPeEsS]?)\Z")
_SCALE = {"": 1, "b": 1, "s": 512, "k": 1 << 10, "m": 1 << 20,
          "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
_INT64_MAX = (1 << 63) - 1
_SIZE_FORMS = ("use a number of bytes with an optional suffix "
               "k, M, G, T, P, E (powers of 1024) or s (512-byte sectors), "
               "e.g. 1G")

# Device names become file names (NAME.sock, NAME.nbd) and CLI arguments.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def help_text():
    """nbdkit's config_help text: one ``key=<PLACEHOLDER>`` line per key."""
    width = max(len("%s=<%s>" % (k, p)) for k, p, _ in PARAMETERS)
    return "\n".join("%-*s %s" % (width, "%s=<%s>" % (k, p), text)
                     for k, p, text in PARAMETERS)


def parse_size(key, text):
    """Bytes in ``text``, by nbdkit's size rules.

    Raises ConfigError naming ``key`` when the text is not a size or the
    size does not fit in a signed 64-bit integer.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise ConfigError("%s: %r is not a size; %s" % (key, text, _SIZE_FORMS))
    sign, number, suffix = match.group(1), int(match.group(2)), match.group(3)
    if sign == "-" and number:
        raise ConfigError("%s: %r is negative; %s" % (key, text, _SIZE_FORMS))
    suffix = suffix.lower()
    size = number * _SCALE[suffix]
    if number > _INT64_MAX or size > _INT64_MAX:
        raise ConfigError("%s: %r is too large; the most is 8E - 1 "
                          "(2^63 - 1 bytes)" % (key, text))
    return size


# nbdkit_parse_bool()'s words, either case.
_TRUE = ("1", "true", "t", "yes", "y", "on")
_FALSE = ("0", "false", "f", "no", "n", "off")


def parse_bool(key, text):
    """True or False by nbdkit's boolean rules; ConfigError naming ``key``
    otherwise."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError("%s: %r is not a boolean; accepted: %s"
                      % (key, text, " ".join(_TRUE + _FALSE)))


def _parse_int(key, text, accepted):
    try:
        return int(text, 10)
    except ValueError:
        raise ConfigError("%s: %r is not a number; accepted: %s"
                          % (key, text, accepted)) from None


@dataclasses.dataclass(frozen=True)
class Params:
    """Validated plugin parameters; sizes in bytes."""

    size: int
    algorithm: str = DEFAULT_ALGORITHM
    level: int = None
    dict_path: str = None
    mem_limit: int = 0
    chain_size: int = DEFAULT_CHAIN_SIZE
    name: str = DEFAULT_NAME
    control: str = None
    swap: bool = False
    backing_dev: str = None
    recomp_algorithm: tuple = ()      # of (algorithm, priority, level)
    policy_interval: int = 0
    policy_idle_age: int = 3600
    policy_recompress: str = None
    policy_writeback: str = None
    policy_max_pages: int = 0

    def device_kwargs(self):
        """Keyword arguments for ``zramd.device.Device``."""
        return dict(size=self.size, algorithm=self.algorithm,
                    level=self.level, dict_path=self.dict_path,
                    mem_limit=self.mem_limit, chain_size=self.chain_size,
                    backing_dev=self.backing_dev)

    def build_device(self):
        """The Device these parameters describe, with its secondary
        algorithms set and its policy running.  Starts threads: call it
        after nbdkit forks."""
        from zramd.device import Device
        from zramd.policy import Policy
        device = Device(**self.device_kwargs())
        for algorithm, priority, level in self.recomp_algorithm:
            device.set_recomp_algorithm(algorithm, priority, level)
        if self.policy_interval:
            device.policy = Policy(device, **self.policy_kwargs())
            device.policy.start()
        return device

    def policy_kwargs(self):
        """Keyword arguments for ``zramd.policy.Policy``."""
        return dict(interval=self.policy_interval,
                    idle_age=self.policy_idle_age,
                    recompress_type=self.policy_recompress,
                    writeback_type=self.policy_writeback,
                    max_pages=self.policy_max_pages)



def parse_recomp_spec(key, text, default_priority=1):
    """One secondary algorithm: ``NAME`` or ``algo=NAME [priority=N]
    [level=N]`` -> (algorithm, priority, level or None).  Raises
    ConfigError naming ``key``."""
    words = text.split()
    if len(words) == 1 and "=" not in words[0]:
        return words[0], default_priority, None
    opts = {}
    for word in words:
        k, sep, v = word.partition("=")
        if not sep or k not in ("algo", "priority", "level") or not v:
            raise ConfigError("%s: %r; accepted: NAME or algo=NAME "
                              "[priority=1..3] [level=N]" % (key, word))
        opts[k] = v
    if "algo" not in opts:
        raise ConfigError("%s: algo= missing in %r; accepted: algo=NAME "
                          "[priority=1..3] [level=N]" % (key, text))
    priority = _parse_int(key, opts.get("priority", str(default_priority)),
                          "1..3")
    if not 1 <= priority <= 3:
        raise ConfigError("%s: priority %d; accepted: 1..3" % (key, priority))
    level = opts.get("level")
    return (opts["algo"], priority,
            None if level is None else _parse_int(key, level, "an integer"))


class ParamParser:
    """Collects ``key=value`` pairs in nbdkit's config order.

    ``set(key, value)`` raises ConfigError for an unknown key, a key given
    twice, or a value of the wrong form; ``complete()`` returns ``Params`` or
    raises ConfigError.
    """

    def __init__(self):
        self._values = {}
        self._raw = {}      # the text as given, for the "given twice" message

    def set(self, key, value):
        if key not in KEYS:
            raise ConfigError("%s: unknown parameter; accepted: %s"
                              % (key, ", ".join(KEYS)))
        if key in self._values:
            raise ConfigError("%s: given twice (%r, then %r)"
                              % (key, self._raw[key], value))
        self._values[key] = getattr(self, "_parse_" + key)(value)
        self._raw[key] = value

    # One parser per key: each returns the parsed value or raises.

    def _parse_size(self, value):
        size = parse_size("size", value)
        if size == 0 or size % PAGE_SIZE:
            raise ConfigError("size: %r is %d bytes; accepted: a positive "
                              "multiple of %d (e.g. 64M, 1G)"
                              % (value, size, PAGE_SIZE))
        return size

    def _parse_algorithm(self, value):
        if not value:
            raise ConfigError("algorithm: empty; accepted: %s"
                              % _algorithm_names())
        return value

    def _parse_level(self, value):
        return _parse_int("level", value, "an integer the algorithm accepts")

    def _parse_dict(self, value):
        if not value:
            raise ConfigError("dict: empty; accepted: a readable zstd "
                              "dictionary file")
        return value

    def _parse_mem_limit(self, value):
        return parse_size("mem_limit", value)

    def _parse_chain_size(self, value):
        accepted = "%d..%d" % (CHAIN_SIZE_MIN, CHAIN_SIZE_MAX)
        chain = _parse_int("chain_size", value, accepted)
        if not CHAIN_SIZE_MIN <= chain <= CHAIN_SIZE_MAX:
            raise ConfigError("chain_size: %d is out of range; accepted: %s"
                              % (chain, accepted))
        return chain

    def _parse_name(self, value):
        if not _NAME_RE.match(value):
            raise ConfigError("name: %r is not a device name; accepted: 1 to "
                              "64 of A-Z a-z 0-9 _ . -, not starting with "
                              "_ . -" % value)
        return value

    def _parse_control(self, value):
        if not value:
            raise ConfigError("control: empty; accepted: a socket path")
        return value

    def _parse_swap(self, value):
        return parse_bool("swap", value)

    def _parse_backing_dev(self, value):
        if not value:
            raise ConfigError("backing_dev: empty; accepted: a writable file "
                              "or block device, or none")
        # "none", as the attribute shows an unset one: no backing device.
        return None if value == "none" else value

    def _parse_recomp_algorithm(self, value):
        specs = [parse_recomp_spec("recomp_algorithm", part, position)
                 for position, part in enumerate(value.split(","), 1)]
        if not specs or len(specs) > 3:
            raise ConfigError("recomp_algorithm: %r; accepted: 1 to 3 "
                              "comma-separated algorithms" % value)
        return tuple(specs)

    def _parse_policy_interval(self, value):
        return _parse_seconds("policy_interval", value)

    def _parse_policy_idle_age(self, value):
        return _parse_seconds("policy_idle_age", value)

    def _parse_policy_max_pages(self, value):
        return _parse_seconds("policy_max_pages", value, "pages >= 0")

    def _parse_policy_recompress(self, value):
        return _parse_pp_type("policy_recompress", value, RECOMPRESS_TYPES)

    def _parse_policy_writeback(self, value):
        return _parse_pp_type("policy_writeback", value, tuple(PP_TYPES))

    def complete(self, check_compressor=True, check_control=True,
                 check_memory=True):
        """Check what needs every key and return ``Params``.

        With ``check_compressor``, builds the compressor once through
        ``zramd.compress.create`` so an unknown algorithm, a bad level or an
        unreadable dictionary is refused now, each under its own key.  With
        ``check_control``, refuses a control socket that another live server
        is answering on.  With ``check_memory``, refuses a size whose slot
        table would not fit in this machine's RAM.
        """
        if "size" not in self._values:
            raise ConfigError("size: required; e.g. size=1G (a positive "
                              "multiple of %d bytes)" % PAGE_SIZE)
        values = dict(self._values)
        if "dict" in values:
            values["dict_path"] = values.pop("dict")
        name = values.get("name", DEFAULT_NAME)
        values.setdefault("control", paths.control_socket(name))
        params = Params(**values)
        if check_memory:
            _check_slot_table(params.size)
        _check_policy(params, self._values)
        if check_compressor:
            _check_compressor(params)
            for algorithm, priority, level in params.recomp_algorithm:
                try:
                    compress.create(algorithm, level=level)
                except ConfigError as err:
                    raise ConfigError("recomp_algorithm: %s" % err.message
                                      ) from None
        if params.backing_dev is not None:
            _check_backing_dev(params.backing_dev)
        if check_control:
            _check_control(params.control)
        return params


def _check_policy(params, given):
    """Refuse policy settings that could never take effect: without
    policy_interval the policy never runs, and its steps need what they
    write back to or recompress with."""
    if not params.policy_interval:
        for key in ("policy_idle_age", "policy_recompress",
                    "policy_writeback", "policy_max_pages"):
            if key in given:
                raise ConfigError("%s: the policy runs only with "
                                  "policy_interval=SECONDS (> 0)" % key)
    if params.policy_writeback and params.backing_dev is None:
        raise ConfigError("policy_writeback: nothing to write back to; "
                          "accepted with backing_dev=PATH")
    if params.policy_recompress and not params.recomp_algorithm:
        raise ConfigError("policy_recompress: no algorithm to recompress "
                          "with; accepted with recomp_algorithm=ALGO")


def _parse_seconds(key, text, accepted="seconds >= 0"):
    value = _parse_int(key, text, accepted)
    if value < 0:
        raise ConfigError("%s: %d; accepted: %s" % (key, value, accepted))
    return value


def _parse_pp_type(key, text, accepted):
    if text not in accepted:
        raise ConfigError("%s: %r; accepted: %s" % (key, text,
                                                    " ".join(accepted)))
    return text


def _check_backing_dev(path):
    """Open the backing device once so a bad path is refused now."""
    from zramd.writeback import BackingDev
    BackingDev(path).close()


def _algorithm_names():
    from zramd import compress
    return " ".join(compress.names())


_COMPRESS_KEY_RE = re.compile(r"\A(algorithm|level|dict_path|dict): ")


def _check_compressor(params):
    """Build the compressor step by step so each error names its key."""
    from zramd import compress

    names = list(compress.names())
    if params.algorithm not in names:
        raise ConfigError("algorithm: unknown %r; accepted: %s"
                          % (params.algorithm, " ".join(names)))
    if params.dict_path is not None:
        try:
            with open(params.dict_path, "rb") as f:
                f.read(1)
        except OSError as err:
            raise ConfigError("dict: cannot read %s: %s; accepted: a "
                              "readable zstd dictionary file"
                              % (params.dict_path, err.strerror)) from None

    def build(key, **kwargs):
        try:
            compress.create(params.algorithm, **kwargs)
        except ConfigError as err:
            # compress names its own argument (algorithm, level,
            # dict_path); say which of our keys it was instead.
            message = _COMPRESS_KEY_RE.sub("", err.message, count=1)
            raise ConfigError("%s: %s" % (key, message)) from None

    build("algorithm")
    if params.level is not None:
        build("level", level=params.level)
    if params.dict_path is not None:
        build("dict", level=params.level, dict_path=params.dict_path)


#: Bytes of slot table per 4 KiB of disk: the device's handle (8), meta (4)
#: and access-time (4) columns (zramd/device.py).
SLOT_TABLE_BYTES = 16


def _mem_total(meminfo="/proc/meminfo"):
    """MemTotal in bytes, or None if unknown."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_slot_table(size, meminfo="/proc/meminfo"):
    """Refuse a disk whose slot table alone would not fit in RAM (as zram's
    disksize_store fails to allocate it): one line now, not a traceback
    from after_fork."""
    table = size // PAGE_SIZE * SLOT_TABLE_BYTES
    total = _mem_total(meminfo)
    if total is not None and table > total:
        raise ConfigError("size: %d bytes needs a slot table of %d MiB (%d "
                          "bytes per 4 KiB), more than this machine's %d MiB "
                          "of RAM" % (size, table >> 20, SLOT_TABLE_BYTES,
                                      total >> 20))


def _check_control(path):
    """Refuse a control socket that a running server still answers on, or
    in a directory another user could write (paths.check_private_dir)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        paths.check_private_dir(directory)
    except FileNotFoundError:
        pass                # made at start, as the owner's
    except paths.UnsafeDirectoryError as err:
        raise ConfigError("control: %s" % err.message) from None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return          # absent, or stale: the control server replaces it
    raise ConfigError("control: %s is in use by another running zramd; "
                      "accepted: a free path (or a different name=)" % path)
