"""The ``zramd`` command: zramctl for zramd devices.

``zramd`` lists every device served from the runtime directory as a table
in zramctl's style; ``zramd attr`` reads or writes one attribute exactly as
its sysfs file would show it; ``zramd classes`` prints the pool's size
classes; ``zramd top`` is a live view.  Everything is asked of the device
over its control socket (zramd.control).

One column table, ``COLUMNS``, drives the listing, like zramctl's
``infos[]``: name, width hint, alignment, help, and how to get and render
the value from a ``status`` reply.  Layout follows libsmartcols for output
that is not a terminal (util-linux's non-tty path, which is also what
scripts see):

- a column is as wide as its widest cell or its header (the header counts
  even with --noheadings); a whole-number width hint is a minimum when the
  header is narrower than the hint (DATA, hint 5, is 5 wide);
- cells are right- or left-aligned per column, separated by one space; the
  last column is not padded when left-aligned;
- --raw: no padding, blanks, backslashes and control characters as \\xHH;
- --json: ``{"zramdevices": [...]}`` with libsmartcols' indentation, keys
  the lowercased column names, numbers as numbers, sizes as strings unless
  --bytes, empty cells as null.

Sizes are util-linux's size_to_human_string(SIZE_SUFFIX_1LETTER): powers
of 1024, one decimal rounded half-up and dropped when zero (1G, 4K, 2.2M,
0B).
"""

import argparse
import json
import os
import re
import select
import sys
import time
from dataclasses import dataclass

from zramd import __version__, control, paths

PROG = "zramd"


# ---------------------------------------------------------------------------
# Formatting


def size_to_human(nbytes):
    """util-linux's size_to_human_string(SIZE_SUFFIX_1LETTER, nbytes)."""
    exp = 0
    while exp < 60 and nbytes >= 1 << (exp + 10):
        exp += 10
    letter = "BKMGTPE"[exp // 10]
    if not exp:
        return "%d%s" % (nbytes, letter)
    dec, frac = nbytes >> exp, nbytes & ((1 << exp) - 1)
    if frac:
        frac = (frac * 1000) >> exp             # thousandths, truncated
        frac = (frac + 50) // 100 * 10          # one digit, half up
        if frac == 100:                         # 1023.96M prints 1024M
            dec, frac = dec + 1, 0
    if not frac:
        return "%d%s" % (dec, letter)
    return "%d.%d%s" % (dec, frac // 10, letter)


def _ratio(status):
    total = status.get("mem_used_total", 0)
    if not total:
        return None
    return status.get("orig_data_size", 0) / total


@dataclass(frozen=True)
class Column:
    """One output column.  ``kind`` picks the rendering: ``size`` (bytes,
    human-readable unless --bytes), ``count``, ``ratio`` or ``text``."""

    name: str
    whint: float
    right: bool
    kind: str
    help: str
    key: object         # status field name, or a function of the status

    def raw(self, status):
        if callable(self.key):
            return self.key(status)
        return status.get(self.key)

    def cell(self, status, in_bytes):
        value = self.raw(status)
        if value is None or value == "":
            return ""
        if self.kind == "size":
            return str(value) if in_bytes else size_to_human(value)
        if self.kind == "ratio":
            return "%.4f" % value
        return str(value)

    def json_value(self, status, in_bytes):
        value = self.raw(status)
        if value is None or value == "":
            return None
        if self.kind == "size" and not in_bytes:
            return size_to_human(value)
        if self.kind == "ratio":
            return round(value, 4)
        return value


# zramctl's columns and order (sys-utils/zramctl.c infos[]), LIMIT spelled
# MEM-LIMIT as there, then HUGE-PAGES and NOTIFY-FREE from mm_stat and
# io_stat.  MOUNTPOINT stays last as in zramctl.
COLUMNS = [
    Column("NAME", 0.25, False, "text", "zramd device name", "name"),
    Column("DISKSIZE", 5, True, "size",
           "limit on the uncompressed amount of data", "disksize"),
    Column("DATA", 5, True, "size", "uncompressed size of stored data",
           "orig_data_size"),
    Column("COMPR", 5, True, "size", "compressed size of stored data",
           "compr_data_size"),
    Column("ALGORITHM", 3, False, "text", "the selected compression algorithm",
           "algorithm"),
    Column("STREAMS", 3, True, "count",
           "number of concurrent compress operations", "streams"),
    Column("ZERO-PAGES", 3, True, "count",
           "empty pages with no allocated memory (same_pages)", "same_pages"),
    Column("TOTAL", 5, True, "size",
           "all memory including allocator fragmentation and metadata "
           "overhead", "mem_used_total"),
    Column("MEM-LIMIT", 5, True, "size",
           "memory limit used to store compressed data", "mem_limit"),
    Column("MEM-USED", 5, True, "size",
           "peak memory used to store compressed data (mem_used_max)",
           "mem_used_max"),
    Column("MIGRATED", 5, True, "count",
           "pages freed by compaction (pages_compacted)", "pages_compacted"),
    Column("COMP-RATIO", 5, True, "ratio", "compression ratio: DATA/TOTAL",
           _ratio),
    Column("HUGE-PAGES", 3, True, "count",
           "incompressible pages stored whole (huge_pages)", "huge_pages"),
    Column("NOTIFY-FREE", 3, True, "count",
           "pages freed by discard or trim (notify_free)", "notify_free"),
    Column("MOUNTPOINT", 0.10, False, "text", "where the device is mounted",
           "mountpoint"),
]
COLUMNS_BY_NAME = {c.name: c for c in COLUMNS}
COLUMN_ALIASES = {"LIMIT": "MEM-LIMIT"}
DEFAULT_COLUMNS = ["NAME", "ALGORITHM", "DISKSIZE", "DATA", "COMPR", "TOTAL",
                   "STREAMS", "MOUNTPOINT"]


def parse_columns(spec):
    """``-o`` LIST: comma-separated names, any case; a leading ``+`` adds
    to the default columns.  Raises ValueError("unknown column: X")."""
    names = list(DEFAULT_COLUMNS) if spec.startswith("+") else []
    for word in spec.lstrip("+").split(","):
        name = word.strip().upper()
        name = COLUMN_ALIASES.get(name, name)
        if name not in COLUMNS_BY_NAME:
            raise ValueError("unknown column: %s" % word)
        names.append(name)
    return [COLUMNS_BY_NAME[n] for n in names]


def _width(column, cells):
    width = max([len(column.name)] + [len(c) for c in cells])
    if column.whint >= 1 and width < column.whint \
            and len(column.name) < column.whint:
        width = int(column.whint)
    return width


def _raw_escape(text):
    """--raw cells as libsmartcols writes them (fputs_nonblank): byte by
    byte, a blank, a backslash and every byte that is not printable ASCII
    as \\xHH, so a cell never contains a separator."""
    return "".join(chr(b) if 0x21 <= b <= 0x7e and b != 0x5c else
                   "\\x%02x" % b
                   for b in text.encode("utf-8", "surrogateescape"))


def _safe(text):
    """Table cells as util-linux's mbs_safe_encode() writes them: printable
    characters as they are, others as \\xHH per byte, and a backslash
    before an x as \\x5c (so the output reads back unambiguously)."""
    out = []
    for i, ch in enumerate(text):
        if ch == "\\" and text[i + 1:i + 2] == "x":
            out.append("\\x5c")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.extend("\\x%02x" % b
                       for b in ch.encode("utf-8", "surrogateescape"))
    return "".join(out)


def render_table(columns, rows, in_bytes=False, raw=False, headings=True):
    """The table text for ``rows`` (status dicts), newline-terminated
    lines; empty when there are no rows, as zramctl prints nothing."""
    if not rows:
        return ""
    cells = [[c.cell(r, in_bytes) for c in columns] for r in rows]
    lines = []
    if raw:
        if headings:
            lines.append(" ".join(c.name for c in columns))
        lines += [" ".join(_raw_escape(x) for x in row) for row in cells]
        return "".join(line + "\n" for line in lines)
    cells = [[_safe(x) for x in row] for row in cells]
    widths = [_width(c, [row[i] for row in cells])
              for i, c in enumerate(columns)]
    last = len(columns) - 1
    for row in ([[c.name for c in columns]] if headings else []) + cells:
        out = []
        for i, (col, text) in enumerate(zip(columns, row)):
            if col.right:
                out.append(text.rjust(widths[i]))
            elif i == last:
                out.append(text)
            else:
                out.append(text.ljust(widths[i]))
        lines.append(" ".join(out))
    return "".join(line + "\n" for line in lines)


def render_json(columns, rows, in_bytes=False):
    """libsmartcols' JSON layout: three-space indents, ``},{`` between
    records."""
    records = []
    for row in rows:
        fields = ['         %s: %s' % (json.dumps(c.name.lower()),
                                       json.dumps(c.json_value(row, in_bytes),
                                                  ensure_ascii=False))
                  for c in columns]
        records.append("{\n" + ",\n".join(fields) + "\n      }")
    body = "      " + ",".join(records) + "\n" if records else ""
    return '{\n   "zramdevices": [\n' + body + "   ]\n}\n"


# ---------------------------------------------------------------------------
# Devices


def _natural_key(name):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def list_devices():
    """Names of the devices with a control socket or a ``zramd up`` state
    file in the runtime dir."""
    try:
        entries = os.listdir(paths.runtime_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = {e[:-len(suffix)] for e in entries
             for suffix in (".sock", ".state.json")
             if e.endswith(suffix) and len(e) > len(suffix)}
    return sorted(names, key=_natural_key)


def lost_reason(name):
    """Why device ``name``, brought up by ``zramd up``, has lost what was
    stored on it (its server exited or was replaced), or None."""
    from zramd import attach
    if "/" in name:
        return None
    try:
        state = attach.read_state(name)
    except attach.AttachError:
        return None
    return attach.lost(state) if state else None


def socket_path(name):
    """A device name, or a path to a control socket if it has a slash."""
    return name if "/" in name else paths.control_socket(name)


def _unescape_proc(text):
    # /proc/self/mounts and /proc/swaps write " \t\n\\" as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _same_device(a, b):
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return sa.st_rdev != 0 and sa.st_rdev == sb.st_rdev


def mountpoint(name, proc="/proc"):
    """``[SWAP]`` if the block device ``zramd up`` attached for ``name`` is
    an active swap, else where it is mounted, else ""."""
    try:
        with open(paths.state_file(name)) as f:
            state = json.load(f)
        device = state.get("block_device")
    except (OSError, ValueError, AttributeError):
        return ""
    if not device:
        return ""
    try:
        with open(os.path.join(proc, "swaps")) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields and _same_device(_unescape_proc(fields[0]), device):
                    return "[SWAP]"
    except OSError:
        pass
    try:
        with open(os.path.join(proc, "self", "mounts")) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0].startswith("/") \
                        and _same_device(_unescape_proc(fields[0]), device):
                    return _unescape_proc(fields[1])
    except OSError:
        pass
    return ""


def fetch_status(name, client=None):
    """The ``status`` reply for ``name`` plus its MOUNTPOINT; the NAME
    shown is the name the device was addressed by.  Raises ControlError."""
    if client is None:
        status = control.call(socket_path(name), "status")
    else:
        status = client.call("status")
    status["name"] = name
    status["mountpoint"] = mountpoint(name)
    return status


# ---------------------------------------------------------------------------
# Commands


def fail(name, reason):
    sys.stderr.write("%s: %s: %s\n" % (PROG, name, reason))
    return 1


def answers(names, fetch):
    """``fetch(name)`` of each device of NAMES (default: every device in
    the runtime directory) that answers, and the exit status: 1 when one
    was lost (its zramd up state says so) or did not answer, each said on
    stderr."""
    try:
        names = names or list_devices()
    except OSError as err:
        return [], fail(paths.runtime_dir(), err.strerror or err)
    replies, status = [], 0
    for name in names:
        reason = lost_reason(name)
        if reason:
            status = fail(name, "lost: %s" % reason)
            continue
        try:
            replies.append(fetch(name))
        except control.ControlError as err:
            status = fail(name, err)
    return replies, status


def cmd_list(args):
    try:
        columns = (list(COLUMNS) if args.output_all
                   else parse_columns(args.output) if args.output
                   else [COLUMNS_BY_NAME[n] for n in DEFAULT_COLUMNS])
    except ValueError as err:
        sys.stderr.write("%s: %s\n" % (PROG, err))
        return 1
    rows, status = answers(args.devices, fetch_status)
    if args.json:
        sys.stdout.write(render_json(columns, rows, args.bytes))
    else:
        sys.stdout.write(render_table(columns, rows, args.bytes, args.raw,
                                      not args.noheadings))
    return status


def cmd_attr(args):
    if not re.fullmatch(r"[A-Za-z0-9_]+", args.attr):
        return fail(args.name, "%r: not an attribute name" % args.attr)
    try:
        if args.value is None:
            reply = control.call(socket_path(args.name), "get " + args.attr)
            sys.stdout.write(reply["value"])
        else:
            if "\n" in args.value.rstrip("\n"):
                return fail(args.name, "%s: a value is one line" % args.attr)
            control.call(socket_path(args.name),
                         "set %s %s" % (args.attr, args.value.rstrip("\n")))
    except control.ControlError as err:
        return fail(args.name, err)
    return 0


def cmd_status(args):
    """Everything the server reports of itself, one ``key: value`` a line
    (sorted), with ``lost:`` first when its zramd up state says so."""
    replies, status = answers(
        args.devices, lambda name: control.call(socket_path(name), "status"))
    for reply in replies:
        for key in sorted(k for k in reply if k not in ("ok", "version")):
            value = reply[key]
            if isinstance(value, str):
                value = value.rstrip("\n")     # a sysfs line's own newline
            if not isinstance(value, str) or "\n" in value:
                value = json.dumps(value)
            sys.stdout.write("%s: %s\n" % (key, value))
    return status


def cmd_classes(args):
    try:
        reply = control.call(socket_path(args.name), "get classes")
    except control.ControlError as err:
        return fail(args.name, err)
    sys.stdout.write(reply["value"])
    return 0


def _rate(value):
    return "-" if value is None else "%.0f" % value


TOP_COLUMNS = [
    COLUMNS_BY_NAME["NAME"],
    COLUMNS_BY_NAME["ALGORITHM"],
    COLUMNS_BY_NAME["DISKSIZE"],
    COLUMNS_BY_NAME["DATA"],
    COLUMNS_BY_NAME["COMPR"],
    COLUMNS_BY_NAME["TOTAL"],
    Column("RATIO", 5, True, "text", "DATA/TOTAL",
           lambda s: "-" if _ratio(s) is None else "%.2f" % _ratio(s)),
    Column("READS/s", 5, True, "text", "read requests per second",
           lambda s: _rate(s.get("reads_per_s"))),
    Column("WRITES/s", 5, True, "text", "write requests per second",
           lambda s: _rate(s.get("writes_per_s"))),
    COLUMNS_BY_NAME["MEM-USED"],
    COLUMNS_BY_NAME["MEM-LIMIT"],
    COLUMNS_BY_NAME["ZERO-PAGES"],
    COLUMNS_BY_NAME["HUGE-PAGES"],
]


class _Keys:
    """'q' quits when stdin is a terminal: cbreak mode while top runs."""

    def __init__(self):
        self.saved = None
        try:
            if sys.stdin.isatty():
                import termios
                import tty
                self.saved = termios.tcgetattr(sys.stdin.fileno())
                tty.setcbreak(sys.stdin.fileno())
        except Exception:
            self.saved = None

    def wait(self, seconds):
        """Sleep ``seconds``; True if the user asked to quit."""
        if self.saved is None:
            time.sleep(seconds)
            return False
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([sys.stdin], [], [], left)
            if ready and os.read(sys.stdin.fileno(), 1) in (b"q", b"Q"):
                return True

    def restore(self):
        if self.saved is not None:
            import termios
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN,
                              self.saved)


def cmd_top(args):
    if args.delay <= 0:
        sys.stderr.write("%s: top: delay must be positive\n" % PROG)
        return 1
    if args.iterations is not None and args.iterations <= 0:
        sys.stderr.write("%s: top: iterations must be positive\n" % PROG)
        return 1
    tty = sys.stdout.isatty()
    previous = {}       # name -> (monotonic time, num_reads, num_writes)
    keys = _Keys()
    try:
        iteration = 0
        while args.iterations is None or iteration < args.iterations:
            iteration += 1
            try:
                names = [args.name] if args.name else list_devices()
            except OSError as err:
                return fail(paths.runtime_dir(), err.strerror or err)
            rows = []
            for name in names:
                try:
                    row = fetch_status(name)
                except control.ControlError as err:
                    if args.name:
                        return fail(name, err)
                    continue        # a device went away: just drop it
                now = time.monotonic()
                reads = row.get("num_reads", 0)
                writes = row.get("num_writes", 0)
                if name in previous:
                    t0, r0, w0 = previous[name]
                    dt = max(now - t0, 1e-9)
                    row["reads_per_s"] = max(reads - r0, 0) / dt
                    row["writes_per_s"] = max(writes - w0, 0) / dt
                previous[name] = (now, reads, writes)
                rows.append(row)
            frame = ["%s top - %s  devices: %d\n"
                     % (PROG, time.strftime("%H:%M:%S"), len(rows))]
            frame.append(render_table(TOP_COLUMNS, rows) if rows
                         else "no zramd devices in %s\n" % paths.runtime_dir())
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J" + "".join(frame))
            else:
                sys.stdout.write(("\n" if iteration > 1 else "")
                                 + "".join(frame))
            sys.stdout.flush()
            if args.iterations is not None and iteration >= args.iterations:
                break
            if keys.wait(args.delay):
                break
    except KeyboardInterrupt:
        pass
    finally:
        keys.restore()
    return 0


# ---------------------------------------------------------------------------
# Argument parsing


class _Parser(argparse.ArgumentParser):
    """util-linux style usage errors: one line, a hint, exit status 1."""

    def error(self, message):
        sys.stderr.write("%s: %s\nTry '%s --help' for more information.\n"
                         % (PROG, message, self.prog))
        sys.exit(1)


def _columns_help():
    width = max(len(c.name) for c in COLUMNS)
    return "Available output columns:\n" + "".join(
        " %*s  %s\n" % (width, c.name, c.help) for c in COLUMNS)


def build_parser():
    """The ``zramd`` parser.  Every subcommand sets ``func(args) -> int``."""
    parser = _Parser(
        prog=PROG,
        description="Show and control zramd devices (zramctl for zramd).",
        usage="%(prog)s [list] [options] [NAME...]\n"
              "       %(prog)s attr NAME ATTR [VALUE]\n"
              "       %(prog)s classes NAME\n"
              "       %(prog)s top [-d SECONDS] [-n N] [NAME]",
        epilog="Without a command, %(prog)s lists the devices (see "
               "'%(prog)s list --help').")
    parser.add_argument("-V", "--version", action="version",
                        version="%s %s" % (PROG, __version__))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                parser_class=_Parser, prog=PROG)

    p = sub.add_parser(
        "list", help="list devices like zramctl (the default command)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_columns_help())
    p.add_argument("devices", nargs="*", metavar="NAME",
                   help="devices to show (default: all in the runtime dir)")
    p.add_argument("-b", "--bytes", action="store_true",
                   help="print sizes in bytes rather than in human readable "
                        "format")
    p.add_argument("-n", "--noheadings", action="store_true",
                   help="don't print headings")
    p.add_argument("-o", "--output", metavar="LIST",
                   help="columns to use for status output ('+' adds to the "
                        "default list)")
    p.add_argument("--output-all", action="store_true",
                   help="output all columns")
    p.add_argument("--raw", action="store_true",
                   help="use raw status output format")
    p.add_argument("-J", "--json", action="store_true",
                   help="use JSON output format")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("attr", help="read or write one attribute, as in "
                       "/sys/block/zramN",
                       description="Print attribute ATTR of device NAME as "
                       "its sysfs file would show it, or write VALUE to it. "
                       "Readable: %s.  Writable: %s; classes is the pool's "
                       "size-class table." % (
                           ", ".join(n for n, a in control.ATTRIBUTES.items()
                                     if a.show),
                           ", ".join(n for n, a in control.ATTRIBUTES.items()
                                     if a.store)))
    p.add_argument("name", metavar="NAME", help="device name")
    p.add_argument("attr", metavar="ATTR", help="attribute name")
    p.add_argument("value", metavar="VALUE", nargs="?",
                   help="value to write (omit to read)")
    p.set_defaults(func=cmd_attr)

    p = sub.add_parser("status", help="print what a server reports of "
                       "itself", description="Print the status of each "
                       "device NAME (default: all), a 'key: value' line "
                       "each: the stats of the table, the requests zramd's "
                       "nbdkit filter served and passed on (filter), and "
                       "the server's own instance id, memory_lock, "
                       "io_flusher and parent_death_signal_cleared.")
    p.add_argument("devices", nargs="*", metavar="NAME")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("classes", help="print the pool's per-class table",
                       description="Print the zsmalloc size-class table of "
                       "device NAME, as the kernel's debugfs "
                       "zsmalloc/<pool>/classes.")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_classes)

    p = sub.add_parser("top", help="live view of rates, ratio and memory",
                       description="Refresh a table of every device (or "
                       "NAME) with read/write rates, compression ratio and "
                       "memory use; 'q' or Ctrl-C quits.")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("-d", "--delay", type=float, default=1.0,
                   metavar="SECONDS", help="seconds between refreshes "
                   "(default 1)")
    p.add_argument("-n", "--iterations", type=int, metavar="N",
                   help="stop after N refreshes")
    p.set_defaults(func=cmd_top)

    # `zramd up` / `zramd down`: zramd/attach.py adds its parsers, each
    # with set_defaults(func=callable(args) -> int) like the ones above.
    from zramd import attach
    attach.add_subcommands(sub)

    parser.commands = sub.choices       # also holds what attach adds
    return parser


def main(argv=None):
    """Entry point of the ``zramd`` console script; returns the exit
    status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or (argv[0] not in parser.commands
                    and argv[0] not in ("-h", "--help", "-V", "--version")):
        argv.insert(0, "list")
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # `zramd | head`: not an error worth a traceback.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
