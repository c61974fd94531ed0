"""The control channel: zram's sysfs directory, spoken over a Unix socket.

A served device has no /sys/block/zramN, so the server process offers the
same attributes on a Unix socket (``NAME.sock`` in the runtime directory,
mode 0600, owned by the user nbdkit runs as).  The protocol is text in,
JSON out, one line each way::

    client                              server
    ------                              ------
    get mm_stat\\n          -->
                           <--   {"version":1,"ok":true,"attr":"mm_stat",
                                  "value":"    4096      ... 0\\n"}\\n
    set mem_limit 1G\\n     -->
                           <--   {"version":1,"ok":true,"attr":"mem_limit"}\\n
    status\\n               -->
                           <--   {"version":1,"ok":true,"name":"zramd0",
                                  "disksize":67108864,...}\\n
    bogus\\n                -->
                           <--   {"version":1,"ok":false,"errno":22,
                                  "error":"bogus: unknown request; ..."}\\n

Requests: ``get ATTR``, ``set ATTR VALUE`` (VALUE is the rest of the
line, and may be empty: ``set compact `` with its trailing space is
``echo > compact``), ``status`` (everything the
``zramd`` table needs in one go), ``attrs`` (the attribute table) and
``ping``.  Every reply carries ``"version": 1`` and ``"ok"``; fields are
only ever added, never renamed (the stats are an interface, see
docs/design.md).  An attribute's ``value`` is byte for byte what the
kernel's sysfs file would hold, newline included; the rendering for each
attribute lives in ``ATTRIBUTES`` below and reuses ``str()`` of the
zramd.stats records.

Robustness, because the channel lives inside the process that serves I/O:

- one thread per connection (capped at ``MAX_CONNECTIONS``), so a client
  that connects and says nothing only parks its own thread; a connection
  must complete each request line within ``IDLE_TIMEOUT`` seconds of the
  last reply (a byte now and then does not keep it), and when all places
  are taken, the connection idle the longest makes way for a newcomer;
- a request longer than ``MAX_REQUEST`` bytes gets one error reply and the
  rest of it, up to the next newline, is discarded; the connection stays
  usable;
- replies are rendered before anything is written, so no device lock is
  ever held while writing to a socket, and a client that does not read
  its replies is dropped after ``SEND_TIMEOUT`` seconds.

The client side is ``request(path, line)`` (one request) and
``ControlClient`` (a kept-open connection, as ``zramd top`` uses); both
raise a ``ControlError`` subclass with a one-line reason when there is no
such socket, the socket is stale (ECONNREFUSED: the server died without
removing it), or permission is denied.
"""

import errno as _errno
import json
import os
import re
import socket
import stat
import struct
import threading
import time
from dataclasses import asdict

from zramd import paths, procctl, threadstate
from zramd.errors import InvalidRequestError, ZramdError
from zramd.params import parse_recomp_spec
from zramd.stats import PolicyStat

PROTOCOL_VERSION = 1

# A request line longer than this (newline excluded) is refused.  The
# longest legitimate request is a short attribute write; 4096 is a page,
# what a sysfs store() is handed at most.
MAX_REQUEST = 4096
# Connections served at once; one more is told so and closed.
MAX_CONNECTIONS = 32
# Seconds a connection may sit without sending a request.
IDLE_TIMEOUT = 60.0
# Seconds a reply may take to be accepted by a client that is not reading.
SEND_TIMEOUT = 5.0
# Refuse replies larger than this on the client side (a classes table with
# every size class is ~25 KiB).
MAX_REPLY = 1 << 20


# ---------------------------------------------------------------------------
# Errors


class ControlError(ZramdError):
    """A control request failed; ``str()`` is a one-line reason."""

    errno = _errno.EIO


class NoSuchDeviceError(ControlError):
    """No control socket at that path: the device is not served."""

    errno = _errno.ENOENT


class StaleSocketError(ControlError):
    """The socket file exists but nobody listens (the server died)."""

    errno = _errno.ECONNREFUSED


class ControlPermissionError(ControlError):
    """The socket (mode 0600) belongs to another user."""

    errno = _errno.EACCES


class ControlTimeoutError(ControlError):
    """The server did not answer in time."""

    errno = _errno.ETIMEDOUT


class RemoteError(ControlError):
    """The server answered with an error reply; ``errno`` is the server's."""

    def __init__(self, message, errno=_errno.EIO):
        super().__init__(message)
        self.errno = errno


# ---------------------------------------------------------------------------
# Attribute values, as the kernel parses them


_NUMBER = r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*"
_MEMPARSE = re.compile(r"(%s)([kmgtpe]?)" % _NUMBER, re.IGNORECASE)
_MEMPARSE_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
#: The kernel's values are u64: kstrtoull refuses more (-ERANGE), where
#: memparse would wrap around silently; we refuse both.
U64_MAX = (1 << 64) - 1


def _u64(value, text):
    if value > U64_MAX:
        raise ValueError("%s: more than 2^64 - 1" % text)
    return value


def _strtoull(digits):
    """simple_strtoull(digits, NULL, 0) for digits matching _NUMBER: 0x is
    hex, a leading 0 octal, anything else decimal."""
    if digits[:2].lower() == "0x":
        return int(digits, 16)
    return int(digits, 8 if digits.startswith("0") else 10)


def memparse(text):
    """Parse a size as the kernel's memparse(): an integer (decimal, 0x hex
    or 0 octal) with an optional K, M, G, T, P or E suffix, any case, each
    a power of 1024.  Surrounding whitespace (sysfs writes end in a
    newline) is ignored; anything else after the number is refused, where
    the kernel would silently ignore it.

    Returns bytes; raises ValueError.
    """
    m = _MEMPARSE.fullmatch(text.strip())
    if not m:
        raise ValueError(text)
    return _u64(_strtoull(m.group(1)) << _MEMPARSE_SHIFT[m.group(2).lower()],
                text)


def _kstrtoull(text):
    """An unsigned integer as kstrtoull(buf, 0) takes it: an optional +,
    one trailing newline allowed; raises ValueError."""
    text = text[:-1] if text.endswith("\n") else text
    m = re.fullmatch(r"\+?(%s)" % _NUMBER, text)
    if not m:
        raise ValueError(text)
    return _u64(_strtoull(m.group(1)), text)


#: The largest mem_limit whose page-aligned size is still a u64 (the
#: kernel's PAGE_ALIGN would wrap a larger one to 0, no limit).
MEM_LIMIT_MAX = (1 << 64) - 4096


def _store_mem_limit(device, value):
    try:
        limit = memparse(value)
        if limit > MEM_LIMIT_MAX:
            raise ValueError(value)
    except ValueError:
        raise InvalidRequestError(
            "mem_limit: invalid value %r: accepted: a size in bytes up to "
            "2^64 - 4096, optionally followed by K, M, G, T, P or E "
            "(0 = no limit)"
            % value) from None
    device.set_mem_limit(limit)


def _store_mem_used_max(device, value):
    # zram's mem_used_max_store: kstrtoul(buf, 10) and only 0 is taken.
    if value.strip() != "0":
        raise InvalidRequestError(
            "mem_used_max: invalid value %r: accepted: 0 (resets the peak "
            "to the current usage)" % value)
    device.reset_mem_used_max()


def _store_compact(device, value):
    # zram's compact_store ignores what was written.
    device.compact()


def _store_idle(device, value):
    if value.strip() == "all":
        device.mark_idle()
        return
    try:
        age = _kstrtoull(value)
    except ValueError:
        raise InvalidRequestError(
            "idle: invalid value %r: accepted: all, or an age in seconds "
            "(slots not accessed for that long are marked idle)"
            % value) from None
    device.mark_idle(age)


def _keyvals(attr, value, keys):
    """Parse ``key=value`` words, as zram's recompress and writeback take
    them; a key may repeat (page_index).  Returns a list of pairs."""
    pairs = []
    for word in value.split():
        key, sep, val = word.partition("=")
        if not sep or key not in keys or not val:
            raise InvalidRequestError(
                "%s: invalid argument %r: accepted: %s" % (
                    attr, word, " ".join(k + "=" for k in keys)))
        pairs.append((key, val))
    return pairs


def _number(attr, key, text):
    try:
        return _kstrtoull(text)
    except ValueError:
        raise InvalidRequestError("%s: %s=%r: accepted: a number up to"
                                  " 2^64 - 1" % (attr, key, text)) from None


def _store_recomp_algorithm(device, value):
    # "algo=zstd priority=1 [level=N]", as zram's recomp_algorithm_store.
    algorithm, priority, level = parse_recomp_spec("recomp_algorithm", value)
    device.set_recomp_algorithm(algorithm, priority, level)


def _store_recompress(device, value):
    # "type=idle|huge|huge_idle threshold=N max_pages=N algo=X priority=N"
    kw = {}
    for key, val in _keyvals("recompress", value, (
            "type", "threshold", "max_pages", "algo", "priority")):
        if key == "type":
            kw["pp_type"] = val
        elif key == "algo":
            kw["algorithm"] = val
        else:
            kw[key] = _number("recompress", key, val)
    device.recompress(**kw)


def _page_indexes(text, nr_pages):
    lo, sep, hi = text.partition("-")
    try:
        first, last = _kstrtoull(lo), _kstrtoull(hi)
    except ValueError:
        first = last = -1
    # Bounded before the range is expanded: one request must not make the
    # server build a list of billions of indexes.
    if not sep or last < first or last >= nr_pages:
        raise InvalidRequestError("writeback: page_indexes=%r: accepted:"
                                  " FIRST-LAST, 0 <= FIRST <= LAST <= %d"
                                  % (text, nr_pages - 1))
    return range(first, last + 1)


def _store_writeback(device, value):
    # "idle" | "huge" | "huge_idle" | "incompressible", or key=value words:
    # type=, page_index=N, page_indexes=FIRST-LAST (inclusive), repeatable.
    words = value.split()
    if len(words) == 1 and "=" not in words[0]:
        device.writeback(words[0])
        return
    pp_type, spans = None, []
    for key, val in _keyvals("writeback", value,
                             ("type", "page_index", "page_indexes")):
        if key == "type":
            pp_type = val
        elif key == "page_index":
            index = _number("writeback", key, val)
            spans.append(range(index, index + 1))
        else:
            spans.append(_page_indexes(val, device.nr_pages))
    device.writeback(pp_type, pages=PageSpans(spans) if spans else None)


class PageSpans:
    """The pages of a writeback request: its ranges merged, so a page named
    twice (or a range repeated to the length of a request line) is visited
    once and nothing is expanded into a list.  Iterable again and again
    (the device checks the indexes, then walks them)."""

    def __init__(self, ranges):
        merged = []
        for r in sorted(ranges, key=lambda r: r.start):
            if merged and r.start <= merged[-1].stop:
                last = merged[-1]
                merged[-1] = range(last.start, max(last.stop, r.stop))
            else:
                merged.append(r)
        self.ranges = merged

    def __iter__(self):
        for r in self.ranges:
            yield from r

    def __len__(self):
        return sum(len(r) for r in self.ranges)


def _store_backing_dev(device, value):
    device.set_backing_dev(value.strip())


def _store_writeback_limit(device, value):
    try:
        limit = _kstrtoull(value)
    except ValueError:
        raise InvalidRequestError("writeback_limit: invalid value %r:"
                                  " accepted: pages (4 KiB), up to 2^64 - 1"
                                  % value) from None
    device.set_writeback_limit(limit)


def _store_writeback_limit_enable(device, value):
    if value.strip() not in ("0", "1"):
        raise InvalidRequestError("writeback_limit_enable: invalid value %r:"
                                  " accepted: 0 or 1" % value)
    device.writeback_limit_enable = value.strip() == "1"


#: train_dict's bounds: a dictionary as compress.MAX_DICT_BYTES allows,
#: and samples of at most 64 MiB of pages held in memory while it trains.
TRAIN_DICT_SIZE = (1024, 1 << 20)
TRAIN_DICT_SAMPLES = (1, 16384)


def _store_train_dict(device, value):
    # zramd's own: "[size=BYTES] [samples=PAGES]".
    opts = dict(_keyvals("train_dict", value, ("size", "samples")))
    size = _number("train_dict", "size", opts.get("size", "16384"))
    samples = _number("train_dict", "samples", opts.get("samples", "4096"))
    for key, got, (low, high) in (("size", size, TRAIN_DICT_SIZE),
                                  ("samples", samples, TRAIN_DICT_SAMPLES)):
        if not low <= got <= high:
            raise InvalidRequestError("train_dict: %s=%d; accepted: %d..%d"
                                      % (key, got, low, high))
    device.train_dictionary(dict_size=size, max_samples=samples)


def _show_policy_stat(device):
    if device.policy is None:
        return str(PolicyStat(0, 0, 0, 0, 0))
    return str(device.policy.stat())


class Attribute:
    """One sysfs-like file: ``show(device) -> str`` for readable ones,
    ``store(device, value)`` and an ``accepts`` text for writable ones."""

    def __init__(self, show=None, store=None, accepts=None, help=""):
        self.show = show
        self.store = store
        self.accepts = accepts
        self.help = help

    @property
    def mode(self):
        return ("r" if self.show else "") + ("w" if self.store else "")


# The kernel's names and formats (drivers/block/zram/zram_drv.c).  The
# classes file is mm/zsmalloc.c's debugfs zsmalloc/<pool>/classes.
ATTRIBUTES = {
    "disksize": Attribute(
        show=lambda d: "%d\n" % d.size,
        help="device size in bytes"),
    "initstate": Attribute(
        show=lambda d: "1\n",
        help="1: a served device is always initialised"),
    "comp_algorithm": Attribute(
        show=lambda d: d.comp_algorithm(),
        help="available algorithms, the selected one in brackets"),
    "mm_stat": Attribute(
        show=lambda d: str(d.mm_stat()),
        help="memory statistics"),
    "io_stat": Attribute(
        show=lambda d: str(d.io_stat()),
        help="failed and notify-free I/O counts"),
    "debug_stat": Attribute(
        show=lambda d: str(d.debug_stat()),
        help="debug counters (format version 1)"),
    "mem_limit": Attribute(
        show=lambda d: "%d\n" % d.mem_limit,
        store=_store_mem_limit,
        accepts="a size with an optional K, M, G, T, P or E suffix",
        help="limit on the memory used to store compressed data"),
    "mem_used_max": Attribute(
        store=_store_mem_used_max, accepts="0",
        help="write 0 to reset the peak memory usage"),
    "compact": Attribute(
        store=_store_compact, accepts="any value",
        help="write anything to compact the pool"),
    "idle": Attribute(
        store=_store_idle, accepts="all, or an age in seconds",
        help="mark slots idle"),
    "classes": Attribute(
        show=lambda d: str(d.pool_stats()),
        help="the pool's per-class table"),
    "recomp_algorithm": Attribute(
        show=lambda d: d.recomp_algorithm(),
        store=_store_recomp_algorithm,
        accepts="algo=NAME [priority=1..3] [level=N]",
        help="secondary compression algorithms by priority"),
    "recompress": Attribute(
        store=_store_recompress,
        accepts="[type=idle|huge|huge_idle] [threshold=N] [max_pages=N]"
                " [algo=NAME | priority=N]",
        help="re-compress stored pages with the secondary algorithms"),
    "backing_dev": Attribute(
        show=lambda d: "%s\n" % (d.backing_dev or "none"),
        store=_store_backing_dev,
        accepts="a writable file or block device",
        help="where writeback puts pages"),
    "writeback": Attribute(
        store=_store_writeback,
        accepts="idle, huge, huge_idle, incompressible, or [type=T]"
                " page_index=N / page_indexes=FIRST-LAST",
        help="move pages to the backing device"),
    "writeback_limit": Attribute(
        show=lambda d: "%d\n" % d.writeback_limit,
        store=_store_writeback_limit, accepts="pages (4 KiB)",
        help="pages writeback may still write while the limit is enabled"),
    "writeback_limit_enable": Attribute(
        show=lambda d: "%d\n" % d.writeback_limit_enable,
        store=_store_writeback_limit_enable, accepts="0 or 1",
        help="whether writeback_limit applies"),
    "bd_stat": Attribute(
        show=lambda d: str(d.bd_stat()),
        help="backing device pages: count, reads, writes"),
    "train_dict": Attribute(
        store=_store_train_dict, accepts="[size=BYTES] [samples=PAGES]",
        help="zramd: train a zstd dictionary on stored pages, use it"),
    "dict_id": Attribute(
        show=lambda d: "%d\n" % d.dictionary_id(),
        help="zramd: id of the dictionary new pages use (0: none)"),
    "policy_stat": Attribute(
        show=_show_policy_stat,
        help="zramd: policy runs, idle marked, recompressed, written"
             " back, errors"),
}


def _names(mode):
    return ", ".join(n for n, a in ATTRIBUTES.items() if mode in a.mode)


def show_attribute(device, name):
    """The text of attribute ``name``, exactly as the kernel prints it.
    Raises InvalidRequestError naming the attribute and what is accepted."""
    attr = ATTRIBUTES.get(name)
    if attr is None:
        raise InvalidRequestError("%s: no such attribute; attributes: %s"
                                  % (name, ", ".join(ATTRIBUTES)))
    if attr.show is None:
        raise InvalidRequestError(
            "%s: write-only attribute (accepted values: %s); readable: %s"
            % (name, attr.accepts, _names("r")))
    return attr.show(device)


def store_attribute(device, name, value):
    """Write ``value`` to attribute ``name``.  Raises InvalidRequestError
    naming the attribute and the accepted values."""
    attr = ATTRIBUTES.get(name)
    if attr is None:
        raise InvalidRequestError("%s: no such attribute; attributes: %s"
                                  % (name, ", ".join(ATTRIBUTES)))
    if attr.store is None:
        raise InvalidRequestError("%s: read-only attribute; writable: %s"
                                  % (name, _names("w")))
    try:
        attr.store(device, value)
    except ZramdError as err:
        # The device names its own argument ("type: 'cold'; accepted:
        # ..."); the client should also read which attribute refused it.
        if err.message.startswith(name + ":"):
            raise
        raise type(err)("%s: %s" % (name, err.message)) from None


def default_streams():
    """Compression streams, as the kernel's max_comp_streams reports them
    since 4.7 (one per online CPU): here, the CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def device_status(device, name):
    """Everything the ``zramd`` table and ``zramd top`` need, in one dict
    of plain values: the kernel's field names for mm_stat, io_stat and
    debug_stat (debug_stat's format version excepted), plus name,
    algorithm, comp_algorithm, disksize, initstate, streams, num_reads,
    num_writes, pid, thread_states (Python thread states kept for
    nbdkit's worker threads, see zramd.threadstate), filter (the requests
    zramd's nbdkit filter served or passed on, None without one;
    Device.filter_counts), and what the server
    process set on itself and its instance id (zramd.procctl.facts).  Only
    ever gains keys."""
    mm = device.mm_stat()
    io = device.io_stat()
    dbg = device.debug_stat()
    out = {"name": name,
           "algorithm": device.algorithm,
           "comp_algorithm": device.comp_algorithm(),
           "disksize": device.size,
           "initstate": 1,
           "streams": getattr(device, "streams", None) or default_streams()}
    out.update(asdict(mm))
    out.update(asdict(io))
    out["miss_free"] = dbg.miss_free
    out["num_reads"] = device.num_reads
    out["num_writes"] = device.num_writes
    out["pid"] = os.getpid()
    out["thread_states"] = threadstate.count()
    out["filter"] = device.filter_counts()
    out.update(procctl.facts)
    return out


# ---------------------------------------------------------------------------
# Server


def _reply(**fields):
    out = {"version": PROTOCOL_VERSION}
    out.update(fields)
    return (json.dumps(out, separators=(",", ":")) + "\n").encode()


def _error(message, errno=_errno.EINVAL):
    return _reply(ok=False, errno=errno, error=message)


class ControlServer:
    """Serves ``device``'s attributes on a Unix socket at ``path``.

    ``start()`` binds (removing a stale socket file first; a live one is
    refused) and serves on daemon threads; ``stop()`` closes everything
    and removes the socket file if it is still ours.  The device's own
    locks make its methods safe to call from these threads.
    """

    def __init__(self, device, path, name):
        self.device = device
        self.path = str(path)
        self.name = name
        self._sock = None
        self._inode = None
        self._thread = None
        self._lock = threading.Lock()      # guards _conns
        # connection -> when it last became idle (waiting for a request,
        # nothing of one received), or None while a request is under way
        self._conns = {}
        self._stopping = False

    # -- life cycle --------------------------------------------------------

    def start(self):
        """Bind the socket (mode 0600) and start the accept thread.
        Raises ControlError if another server answers at ``path`` or the
        path is something other than a socket."""
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, mode=0o755, exist_ok=True)
            try:
                paths.check_private_dir(directory)
            except paths.UnsafeDirectoryError as err:
                raise ControlError(err.message) from None
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound and listening under a temporary name, then linked to the
        # real one: a client that finds the path finds a listener (between
        # bind and listen a connect is refused, as if the socket were
        # stale), and link(), unlike rename(), never replaces a socket
        # another server put there meanwhile.
        staging = os.path.join(directory, ".zramd-control.%d.%d"
                               % (os.getpid(), threading.get_ident() % 10**6))
        try:
            # Linux takes the mode of the socket file from the socket's
            # inode at bind time: set it first, so there is no window in
            # which another user could connect.
            os.fchmod(sock.fileno(), 0o600)
            sock.bind(staging)
            try:
                os.chmod(staging, 0o600)
                sock.listen(16)
                os.link(staging, self.path)
            except FileExistsError:
                raise ControlError("%s: another server is listening"
                                   % self.path) from None
            finally:
                os.unlink(staging)
        except BaseException:
            sock.close()
            raise
        self._inode = os.stat(self.path).st_ino
        self._sock = sock
        self._stopping = False
        self._thread = threading.Thread(target=self._accept_loop,
                                        name="zramd-control", daemon=True)
        self._thread.start()

    def stop(self):
        """Stop serving, close every connection and remove the socket file
        (unless another server has replaced it since)."""
        self._stopping = True
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)   # wakes accept()
            except OSError:
                pass
            sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _remove_stale(self):
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError("%s: exists and is not a socket" % self.path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(self.path)
        except ConnectionRefusedError:
            os.unlink(self.path)            # nobody listens: stale
            return
        except OSError as err:
            # A full backlog (EAGAIN), a timeout (a stopped server) or a
            # permission error says nothing of whether a server is there.
            raise ControlError("%s: cannot tell whether a server listens "
                               "(%s); not replacing it"
                               % (self.path, err.strerror or err)) from None
        finally:
            probe.close()
        raise ControlError("%s: another server is listening" % self.path)

    # -- serving -----------------------------------------------------------

    def _accept_loop(self):
        sock = self._sock
        while not self._stopping:
            try:
                conn, _ = sock.accept()
            except OSError:
                if self._stopping:
                    return
                continue
            with self._lock:
                evicted = None
                if len(self._conns) >= MAX_CONNECTIONS:
                    idle = [(since, id(c), c) for c, since
                            in self._conns.items() if since is not None]
                    if idle:
                        evicted = min(idle)[2]
                        del self._conns[evicted]
                crowded = len(self._conns) >= MAX_CONNECTIONS
                if not crowded:
                    self._conns[conn] = time.monotonic()
            if evicted is not None:
                try:
                    evicted.shutdown(socket.SHUT_RDWR)   # wakes its recv
                except OSError:
                    pass
            if crowded:
                try:
                    conn.settimeout(0.5)
                    conn.sendall(_error("too many connections (at most %d)"
                                        % MAX_CONNECTIONS, _errno.EBUSY))
                except OSError:
                    pass
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,),
                             name="zramd-control-conn", daemon=True).start()

    def _serve(self, conn):
        buf = bytearray()
        discarding = False          # inside the tail of an oversized line
        deadline = time.monotonic() + IDLE_TIMEOUT
        try:
            while not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                conn.settimeout(left)
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                self._mark(conn, idle=False)
                buf += chunk
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        if len(buf) > MAX_REQUEST:
                            if not discarding:
                                discarding = True
                                self._send(conn, _error(
                                    "request too long (more than %d bytes "
                                    "without a newline); discarded"
                                    % MAX_REQUEST))
                            buf.clear()
                        break
                    line = bytes(buf[:nl])
                    del buf[:nl + 1]
                    if discarding:
                        discarding = False
                        continue
                    if len(line) > MAX_REQUEST:
                        self._send(conn, _error(
                            "request too long (more than %d bytes)"
                            % MAX_REQUEST))
                        continue
                    self._send(conn, self.handle(line))
                    deadline = time.monotonic() + IDLE_TIMEOUT
                if not buf and not discarding:
                    self._mark(conn, idle=True)
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.pop(conn, None)
            conn.close()

    def _mark(self, conn, idle):
        """Record whether ``conn`` waits for a request with nothing of one
        received (it may then make way for a newcomer)."""
        with self._lock:
            if conn in self._conns:
                self._conns[conn] = time.monotonic() if idle else None

    @staticmethod
    def _send(conn, data):
        conn.settimeout(SEND_TIMEOUT)
        conn.sendall(data)      # OSError (timeout included) drops the client

    def handle(self, line):
        """Answer one request line (bytes, no newline) with one reply line
        (bytes).  Never raises: every failure is an error reply."""
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return _error("malformed request: not UTF-8")
        text = text.rstrip("\r")
        words = text.split(None, 2)
        if not words:
            return _error("malformed request: empty line; requests: "
                          "get ATTR, set ATTR VALUE, status, attrs, ping")
        op = words[0]
        try:
            if op == "get" and len(words) == 2:
                return _reply(ok=True, attr=words[1],
                              value=show_attribute(self.device, words[1]))
            if op == "set" and (len(words) == 3 or len(words) == 2
                                and text[-1:].isspace()):
                value = words[2] if len(words) == 3 else ""
                store_attribute(self.device, words[1], value)
                return _reply(ok=True, attr=words[1])
            if op == "status" and len(words) == 1:
                return _reply(ok=True, **device_status(self.device,
                                                       self.name))
            if op == "attrs" and len(words) == 1:
                return _reply(ok=True, attrs={
                    n: {"mode": a.mode, "accepts": a.accepts, "help": a.help}
                    for n, a in ATTRIBUTES.items()})
            if op == "ping" and len(words) == 1:
                return _reply(ok=True, name=self.name)
        except ZramdError as err:
            return _error(err.message, err.errno)
        except Exception as err:     # a bug must not end the connection
            return _error("%s: internal error: %s: %s"
                          % (op, type(err).__name__, err), _errno.EIO)
        usage = {"get": "get ATTR", "set": "set ATTR VALUE",
                 "status": "status", "attrs": "attrs", "ping": "ping"}
        if op in usage:
            return _error("malformed request: usage: %s" % usage[op])
        return _error("%s: unknown request; requests: get ATTR, "
                      "set ATTR VALUE, status, attrs, ping" % op[:64])


# ---------------------------------------------------------------------------
# Client


class ControlClient:
    """A connection to one control socket, for several requests.

    Raises NoSuchDeviceError, StaleSocketError, ControlPermissionError or
    ControlError on connecting; ``call()`` raises RemoteError for an error
    reply and ControlTimeoutError when the server is silent."""

    def __init__(self, path, timeout=5.0):
        self.path = str(path)
        self._buf = b""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise NoSuchDeviceError("no such device") from None
        except ConnectionRefusedError:
            sock.close()
            raise StaleSocketError(
                "stale control socket (no server listening)") from None
        except PermissionError:
            sock.close()
            raise ControlPermissionError("permission denied") from None
        except socket.timeout:
            sock.close()
            raise ControlTimeoutError("control socket: connect timed out") \
                from None
        except OSError as err:
            sock.close()
            raise ControlError("control socket: %s" % err.strerror) from None
        # Only a server of ours or root's is believed: another user could
        # have put a socket of theirs where ours was.
        uid = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
        if uid not in (os.geteuid(), 0):
            sock.close()
            raise ControlPermissionError(
                "served by uid %d, neither us (uid %d) nor root; not "
                "believed" % (uid, os.geteuid()))
        self.sock = sock

    def request(self, line):
        """Send one request line; return the reply dict as sent (which may
        be an error reply with ``ok`` false)."""
        if "\n" in line:
            raise ValueError("a request is one line")
        send_error = None
        try:
            try:
                self.sock.sendall(line.encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError) as err:
                # The server may have answered and closed first (too many
                # connections): read what it said.
                send_error = err
            while b"\n" not in self._buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    if send_error is not None:
                        raise send_error
                    raise ControlError("server closed the connection")
                self._buf += chunk
                if len(self._buf) > MAX_REPLY:
                    raise ControlError("reply too long")
        except socket.timeout:
            raise ControlTimeoutError("no reply in time") from None
        except OSError as err:
            raise ControlError("control socket: %s"
                               % (err.strerror or err)) from None
        raw, self._buf = self._buf.split(b"\n", 1)
        try:
            reply = json.loads(raw)
        except ValueError:
            raise ControlError("malformed reply from server") from None
        if not isinstance(reply, dict):
            raise ControlError("malformed reply from server")
        return reply

    def call(self, line):
        """Like request() but raise RemoteError for an error reply."""
        reply = self.request(line)
        if not reply.get("ok"):
            raise RemoteError(reply.get("error", "request failed"),
                              reply.get("errno", _errno.EIO))
        return reply

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def request(path, line, timeout=5.0):
    """Send one request to the control socket at ``path``; return the
    reply dict (``ok`` false for an error reply).  Raises
    NoSuchDeviceError, StaleSocketError, ControlPermissionError,
    ControlTimeoutError or ControlError."""
    with ControlClient(path, timeout) as client:
        return client.request(line)


def call(path, line, timeout=5.0):
    """Like request() but raise RemoteError for an error reply."""
    with ControlClient(path, timeout) as client:
        return client.call(line)
