"""Tests for zramd.compress: every registered backend round-trips pages of
every kind, reports corruption as CorruptDataError naming itself and the
slot, and is safe to share between threads; the registry's names,
comp_algorithm text and configuration errors are exact."""

import errno
import glob
import json
import mmap
import os
import random
import sysconfig
import threading

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

from zramd import PAGE_SIZE, compress
from zramd.errors import ConfigError, CorruptDataError

NAMES = compress.names()
# Real text and code that every machine running these tests has, the same
# on each: zramd's own sources, and the bytecode compiled from them.
# Real data that stays the same while zramd changes: modules of the running
# Python's standard library (a release's own, so the same on every run of
# it; zramd's own sources changed the pages, and what the corruption tests
# met, with every commit).
STDLIB_MODULES = ("argparse", "ast", "asyncio/base_events", "collections/__init__",
                  "configparser", "dataclasses", "datetime", "decimal",
                  "email/message", "enum", "functools", "inspect",
                  "json/decoder", "logging/__init__", "pathlib", "pickle",
                  "shutil", "socket", "subprocess", "tarfile", "threading",
                  "typing", "unittest/case", "zipfile")
SOURCES = [path for path in (
    os.path.join(sysconfig.get_paths()["stdlib"], name + ".py")
    for name in STDLIB_MODULES) if os.path.isfile(path)]

# One instance per backend for the whole module: instances are meant to be
# shared, and zstd's construction does a self-test round trip.
_INSTANCES = {}


def backend(name):
    if name not in _INSTANCES:
        _INSTANCES[name] = compress.create(name)
    return _INSTANCES[name]


by_name = pytest.mark.parametrize("name", NAMES)


def _chunks(data, count):
    """``count`` whole pages spread evenly over ``data``."""
    n = len(data) // PAGE_SIZE
    step = max(1, n // count)
    return [data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in range(0, n, step)][:count]


def _random_pages(count, seed):
    rnd = random.Random(seed)
    return [rnd.randbytes(PAGE_SIZE) for _ in range(count)]


def _text_page(seed=0):
    """Log-like lines: highly compressible, different for each seed."""
    rnd = random.Random(seed)
    words = [b"page", b"slot", b"zram", b"class", b"frame", b"handle", b"lz4", b"zstd"]
    line = b" ".join(rnd.choice(words) for _ in range(8))
    out, n = b"", 0
    while len(out) < PAGE_SIZE:
        out += b"%06d: %s\n" % (seed * 1000 + n, line)
        n += 1
    return out[:PAGE_SIZE]


def _sources():
    out = []
    for path in SOURCES:
        with open(path, "rb") as f:
            out.append((path, f.read()))
    return out


def _instructions(code):
    """The bytecode of ``code`` and of every function in it (co_code only:
    marshal's output depends on reference counts)."""
    yield code.co_code
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            yield from _instructions(const)


def _real_pages():
    """24 pages of Python source and 24 of the bytecode compiled from it."""
    sources = _sources()
    text = b"".join(source for _, source in sources)
    code = b"".join(b for path, source in sources
                    for b in _instructions(compile(source, path, "exec")))
    pages = _chunks(text, 24) + _chunks(code, 24)
    assert len(pages) == 48, len(pages)
    return pages


def _record(rnd):
    return json.dumps({
        "id": rnd.randrange(10 ** 6),
        "user": rnd.choice(["alice", "bob", "carol", "dave"]),
        "status": rnd.choice(["active", "suspended", "deleted"]),
        "email_verified": rnd.random() < 0.5,
        "created_at": "2024-%02d-%02dT%02d:00:00Z" % (
            rnd.randint(1, 12), rnd.randint(1, 28), rnd.randint(0, 23)),
        "tags": rnd.sample(["red", "green", "blue", "admin", "staff", "guest"], 2),
    }).encode() + b"\n"


def _record_page(rnd, records=None):
    """A page of JSON records; with ``records``, that many and zero-padded
    (a small file's last page)."""
    if records is not None:
        return b"".join(_record(rnd) for _ in range(records)).ljust(PAGE_SIZE, b"\0")
    out = b""
    while len(out) < PAGE_SIZE:
        out += _record(rnd)
    return out[:PAGE_SIZE]


def _round_trip(comp, page):
    data = comp.compress(page)
    assert isinstance(data, bytes)
    out = comp.decompress(data, slot=7)
    assert type(out) is bytes
    assert len(out) == PAGE_SIZE
    assert out == bytes(page)
    return data


# --- round trips -------------------------------------------------------------

@by_name
def test_round_trip_random_pages(name):
    comp = backend(name)
    for page in _random_pages(8, seed=1):
        _round_trip(comp, page)


@by_name
def test_round_trip_zero_and_filled_pages(name):
    comp = backend(name)
    for fill in (0x00, 0xFF, 0x5A):
        page = bytes([fill]) * PAGE_SIZE
        data = _round_trip(comp, page)
        # Same-filled pages shrink to a few dozen bytes at most.
        assert len(data) < 64, (fill, len(data))


@by_name
def test_round_trip_text_compresses(name):
    comp = backend(name)
    for seed in range(4):
        page = _text_page(seed)
        data = _round_trip(comp, page)
        assert len(data) < PAGE_SIZE // 3, len(data)


@by_name
def test_round_trip_real_data(name):
    comp = backend(name)
    pages = _real_pages()
    total = sum(len(_round_trip(comp, page)) for page in pages)
    # Code and text: every backend saves at least a third.
    assert total < len(pages) * PAGE_SIZE * 2 // 3, total


@by_name
def test_buffer_types(name):
    """compress takes bytes, bytearray and memoryview; decompress takes any
    bytes-like, including a memoryview slice of an mmap (what the pool
    hands out)."""
    comp = backend(name)
    page = _text_page(9)
    data = comp.compress(page)
    assert comp.compress(bytearray(page)) == data
    assert comp.compress(memoryview(page)) == data
    assert comp.compress(memoryview(b"x" + page + b"y")[1:-1]) == data
    assert comp.decompress(bytearray(data)) == page
    with mmap.mmap(-1, PAGE_SIZE) as mm:
        mm[100:100 + len(data)] = data
        view = memoryview(mm)[100:100 + len(data)]
        try:
            assert comp.decompress(view, slot=3) == page
        finally:
            view.release()


@by_name
def test_incompressible_page_still_round_trips(name):
    # Random data grows a little; storing it raw is the device's call.
    comp = backend(name)
    page = _random_pages(1, seed=99)[0]
    data = _round_trip(comp, page)
    assert len(data) >= PAGE_SIZE - 16


def _page_strategy():
    """Pages built from runs and random pieces, cut or zero-padded to 4096:
    compressible, incompressible and everything between."""
    piece = st.one_of(
        st.binary(min_size=1, max_size=300),
        st.builds(lambda b, n: bytes([b]) * n, st.integers(0, 255), st.integers(1, 2000)),
        st.builds(lambda s, n: s * n, st.binary(min_size=1, max_size=16), st.integers(1, 200)),
    )
    return st.lists(piece, max_size=30).map(
        lambda parts: b"".join(parts)[:PAGE_SIZE].ljust(PAGE_SIZE, b"\0"))


@by_name
@settings(max_examples=60, deadline=None)
@given(page=_page_strategy())
def test_hypothesis_round_trip(name, page):
    _round_trip(backend(name), page)


@by_name
# Every example is a whole page, the smallest too: that is the point here,
# and newer hypothesis refuses so large a minimal example unless told.
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.large_base_example])
@given(page=st.binary(min_size=PAGE_SIZE, max_size=PAGE_SIZE))
def test_hypothesis_round_trip_arbitrary(name, page):
    _round_trip(backend(name), page)


# --- corruption --------------------------------------------------------------

def _expect_corrupt(comp, data, slot):
    with pytest.raises(CorruptDataError) as info:
        comp.decompress(data, slot=slot)
    err = info.value
    assert err.errno == errno.EIO
    assert str(err).startswith("%s decompress: slot %d: " % (comp.name, slot)), str(err)
    assert len(str(err)) > len("%s decompress: slot %d: " % (comp.name, slot))
    return err


@by_name
def test_corrupt_truncated(name):
    comp = backend(name)
    for page in (_text_page(1), _real_pages()[3], bytes(PAGE_SIZE)):
        data = comp.compress(page)
        for cut in {1, 2, len(data) // 2, len(data) - 1}:
            _expect_corrupt(comp, data[:cut], slot=12)


@by_name
def test_corrupt_empty(name):
    _expect_corrupt(backend(name), b"", slot=0)
    _expect_corrupt(backend(name), memoryview(b""), slot=1)


@by_name
def test_corrupt_trailing_bytes(name):
    comp = backend(name)
    data = comp.compress(_text_page(2))
    _expect_corrupt(comp, data + b"\0", slot=5)
    _expect_corrupt(comp, data + data, slot=6)


@by_name
def test_corrupt_garbage(name):
    comp = backend(name)
    rnd = random.Random(1234)
    for size in (1, 2, 3, 7, 64, 1000, 4000, 4096, 5000):
        for _ in range(5):
            _expect_corrupt(comp, rnd.randbytes(size), slot=size)


@by_name
def test_corrupt_short_page(name):
    """A valid stream of the wrong length is corrupt too."""
    comp = backend(name)
    data = comp.compress(_text_page(3))
    short = compress.create(name)  # same settings, fed a shorter input
    for n in (0, 100, PAGE_SIZE - 1):
        _expect_corrupt(comp, short.compress(_text_page(3)[:n]), slot=n)
    _expect_corrupt(comp, short.compress(_text_page(3) + b"x"), slot=1)
    assert comp.decompress(data) == _text_page(3)


@by_name
def test_corrupt_flipped_first_byte(name):
    """The first byte is structure in every format (lz4's first token,
    zstd's frame header, deflate's block header): flipping it is caught
    for most pages.  Not for all: no format here has a checksum or a magic
    (zram's have none), and an lz4hc page of the standard library decodes
    to another whole page with its first token flipped.  What must never
    happen is another exception or an output that is not one page."""
    comp = backend(name)
    pages = [_text_page(4), bytes(PAGE_SIZE)] + _real_pages()
    caught = 0
    for i, page in enumerate(pages):
        data = bytearray(comp.compress(page))
        data[0] ^= 0xFF
        try:
            out = comp.decompress(bytes(data), slot=i)
        except CorruptDataError:
            _expect_corrupt(comp, data, slot=i)     # and its message
            caught += 1
        else:
            assert len(out) == PAGE_SIZE
    assert caught >= len(pages) * 3 // 4, (caught, len(pages))


@by_name
def test_corrupt_flipped_bytes_never_escape(name):
    """Without checksums (zram has none) a flipped byte may decode to a
    different page; what must never happen is another exception or an
    output that is not one page."""
    comp = backend(name)
    page = _real_pages()[1]
    data = comp.compress(page)
    raised = silent = 0
    for i in range(len(data)):
        for mask in (0xFF, 0x10):
            bad = bytearray(data)
            bad[i] ^= mask
            try:
                out = comp.decompress(bad, slot=i)
            except CorruptDataError as err:
                assert err.errno == errno.EIO
                assert str(err).startswith("%s decompress: slot %d: " % (name, i))
                raised += 1
            else:
                assert type(out) is bytes and len(out) == PAGE_SIZE
                silent += 1
    assert raised > len(data) // 10, (raised, silent)


@by_name
def test_corrupt_message_without_slot(name):
    with pytest.raises(CorruptDataError) as info:
        backend(name).decompress(b"\xff" * 10)
    assert str(info.value).startswith(name + " decompress: ")
    assert "slot" not in str(info.value)
    assert info.value.errno == errno.EIO


# --- registry ----------------------------------------------------------------

ALL = ["lz4", "lz4hc", "zstd", "deflate", "lzo-rle", "lzo"]


def test_names_in_table_order():
    assert compress.names() == ALL
    compress.names().append("bogus")  # a copy: the table cannot be changed
    assert compress.names() == ALL


@pytest.mark.parametrize("active, text", [
    ("lz4", "[lz4] lz4hc zstd deflate lzo-rle lzo \n"),
    ("lz4hc", "lz4 [lz4hc] zstd deflate lzo-rle lzo \n"),
    ("zstd", "lz4 lz4hc [zstd] deflate lzo-rle lzo \n"),
    ("deflate", "lz4 lz4hc zstd [deflate] lzo-rle lzo \n"),
    ("lzo-rle", "lz4 lz4hc zstd deflate [lzo-rle] lzo \n"),
    ("lzo", "lz4 lz4hc zstd deflate lzo-rle [lzo] \n"),
])
def test_available_golden(active, text):
    assert compress.available(active) == text


def test_available_unknown():
    with pytest.raises(ConfigError):
        compress.available("842")


@pytest.mark.parametrize("name, level", [
    ("lz4", None), ("lz4hc", 9), ("zstd", 3), ("deflate", 6),
    ("lzo-rle", None), ("lzo", None),
])
def test_default_levels(name, level):
    comp = compress.create(name)
    assert comp.name == name
    assert comp.level == level
    assert isinstance(comp, compress.Compressor)


@pytest.mark.parametrize("name, lo, hi", [("lz4hc", 1, 12), ("zstd", 1, 22), ("deflate", 1, 9)])
def test_level_range(name, lo, hi):
    page = _text_page(5)
    for level in (lo, hi):
        comp = compress.create(name, level=level)
        assert comp.level == level
        _round_trip(comp, page)
    for level in (lo - 1, hi + 1, -5):
        with pytest.raises(ConfigError) as info:
            compress.create(name, level=level)
        msg = str(info.value)
        assert msg == "level: %d out of range for %s; accepted: %d..%d" % (level, name, lo, hi)
        assert info.value.errno == errno.EINVAL


def test_level_errors():
    with pytest.raises(ConfigError, match=r"^level: lz4 takes no level; got 3$"):
        compress.create("lz4", level=3)
    with pytest.raises(ConfigError, match=r"^level: '9' is not an integer; accepted for zstd: 1\.\.22$"):
        compress.create("zstd", level="9")
    with pytest.raises(ConfigError, match="not an integer"):
        compress.create("deflate", level=True)
    with pytest.raises(ConfigError, match="not an integer"):
        compress.create("lz4hc", level=4.0)


@pytest.mark.parametrize("bad", ["foo", "LZ4", "", "842", "lzo_rle", None, 3])
def test_unknown_algorithm(bad):
    with pytest.raises(ConfigError) as info:
        compress.create(bad)
    assert str(info.value) == ("algorithm: unknown %r; accepted: lz4 lz4hc "
                               "zstd deflate lzo-rle lzo" % (bad,))
    assert info.value.errno == errno.EINVAL


def test_every_level_round_trips():
    pages = [_text_page(6), _real_pages()[5], bytes(PAGE_SIZE)]
    for name, top in (("lz4hc", 12), ("zstd", 22), ("deflate", 9)):
        for level in range(1, top + 1):
            comp = compress.create(name, level=level)
            for page in pages:
                _round_trip(comp, page)


@pytest.mark.parametrize("name, low, high", [("lz4hc", 1, 12), ("zstd", 1, 19), ("deflate", 1, 9)])
def test_levels_change_output(name, low, high):
    fast = compress.create(name, level=low)
    slow = compress.create(name, level=high)
    pages = _real_pages()
    fast_out = [fast.compress(p) for p in pages]
    slow_out = [slow.compress(p) for p in pages]
    assert fast_out != slow_out
    assert sum(map(len, slow_out)) < sum(map(len, fast_out))
    # Both are read by either instance: the level is a compression choice.
    for page, a, b in zip(pages, fast_out, slow_out):
        assert slow.decompress(a) == page
        assert fast.decompress(b) == page


def test_lz4hc_beats_lz4_and_shares_format():
    lz4, hc = compress.create("lz4"), compress.create("lz4hc")
    pages = _real_pages()
    assert sum(len(hc.compress(p)) for p in pages) < sum(len(lz4.compress(p)) for p in pages)
    for page in pages[:8]:
        assert lz4.decompress(hc.compress(page)) == page


def test_zstd_frame_is_minimal():
    """Magicless, no content size, no checksum, no dictionary id: smaller
    than zstandard's default framing by at least the 4-byte magic."""
    comp = compress.create("zstd")
    plain = zstandard.ZstdCompressor(level=3)
    magic = zstandard.MAGIC_NUMBER.to_bytes(4, "little")
    for page in [bytes(PAGE_SIZE), _text_page(7)] + _real_pages()[:6]:
        data = comp.compress(page)
        assert not data.startswith(magic)
        assert len(data) <= len(plain.compress(page)) - 4
        assert data[0] == 0  # frame header: no size, checksum or dict id fields


# --- dictionaries ------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_dict(tmp_path_factory):
    rnd = random.Random(42)
    samples = [_record_page(rnd) for _ in range(64)]
    zdict = zstandard.train_dictionary(8192, samples, k=64, d=8)
    path = tmp_path_factory.mktemp("dict") / "records.zdict"
    path.write_bytes(zdict.as_bytes())
    return path


def test_zstd_dictionary_round_trips_and_helps(trained_dict):
    with_dict = compress.create("zstd", dict_path=str(trained_dict))
    without = compress.create("zstd")
    assert with_dict.level == 3
    rnd = random.Random(7)  # new records, not the training samples
    small = [_record_page(rnd, records=3) for _ in range(20)]
    full = [_record_page(rnd) for _ in range(10)]
    for page in small + full + [bytes(PAGE_SIZE), _random_pages(1, 3)[0]]:
        _round_trip(with_dict, page)
    small_with = sum(len(with_dict.compress(p)) for p in small)
    small_without = sum(len(without.compress(p)) for p in small)
    assert small_with < small_without * 0.7, (small_with, small_without)
    full_with = sum(len(with_dict.compress(p)) for p in full)
    full_without = sum(len(without.compress(p)) for p in full)
    assert full_with < full_without, (full_with, full_without)


def test_zstd_dictionary_levels_and_pathlike(trained_dict):
    page = _record_page(random.Random(8), records=5)
    for level in (1, 9, 19):
        _round_trip(compress.create("zstd", level=level, dict_path=trained_dict), page)


def test_zstd_raw_content_dictionary(tmp_path):
    """Any file works as raw-content dictionary; a large one too (the frame
    window stays one page, which the decompressor enforces)."""
    source = b"".join(source for _, source in _sources())
    path = tmp_path / "raw.dict"
    path.write_bytes((source * 8)[:64 * 1024])
    comp = compress.create("zstd", dict_path=str(path))
    for page in _chunks(source, 4) + [_text_page(10)]:
        _round_trip(comp, page)


def test_dictionary_errors(tmp_path, trained_dict):
    for name in ("lz4", "lz4hc", "deflate"):
        with pytest.raises(ConfigError) as info:
            compress.create(name, dict_path=str(trained_dict))
        assert str(info.value) == ("dict_path: %s: %s takes no dictionary; accepted by: zstd"
                                   % (trained_dict, name))
    missing = tmp_path / "missing.dict"
    with pytest.raises(ConfigError) as info:
        compress.create("zstd", dict_path=str(missing))
    assert str(info.value) == "dict_path: %s: No such file or directory" % missing
    assert info.value.errno == errno.EINVAL
    with pytest.raises(ConfigError, match="^dict_path: .*: Is a directory$"):
        compress.create("zstd", dict_path=str(tmp_path))
    empty = tmp_path / "empty.dict"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match="^dict_path: .*empty.dict: empty file$"):
        compress.create("zstd", dict_path=str(empty))
    # zstd's dictionary magic, then garbage: not usable.
    broken = tmp_path / "broken.dict"
    broken.write_bytes(b"\x37\xa4\x30\xec" + random.Random(1).randbytes(300))
    with pytest.raises(ConfigError, match="^dict_path: .*broken.dict: .*zstd"):
        compress.create("zstd", dict_path=str(broken))


def test_dictionary_must_be_a_bounded_regular_file(tmp_path):
    # dict=/dev/zero grew without bound, and a FIFO hung nbdkit.
    fifo = tmp_path / "fifo.dict"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        with pytest.raises(ConfigError) as info:
            compress.create("zstd", dict_path=str(path))
        assert str(info.value) == "dict_path: %s: not a regular file" % path
    big = tmp_path / "big.dict"
    big.write_bytes(bytes(compress.MAX_DICT_BYTES + 1))
    with pytest.raises(ConfigError) as info:
        compress.create("zstd", dict_path=str(big))
    assert str(info.value) == ("dict_path: %s: larger than %d bytes"
                               % (big, compress.MAX_DICT_BYTES))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_dictionary_unreadable(tmp_path, trained_dict):
    path = tmp_path / "secret.dict"
    path.write_bytes(trained_dict.read_bytes())
    path.chmod(0)
    with pytest.raises(ConfigError, match="^dict_path: .*secret.dict: Permission denied$"):
        compress.create("zstd", dict_path=str(path))


# --- threads -----------------------------------------------------------------

@by_name
def test_threads_share_one_instance(name):
    """Threads compress and decompress different pages through one
    instance at once, and read back pages compressed by the others."""
    comp = compress.create(name)
    nthreads, rounds = 4, 30
    rnd = random.Random(11)
    real = _real_pages()
    pages = [[_record_page(rnd) if i % 3 == 0 else real[(t * 7 + i) % len(real)]
              if i % 3 == 1 else _text_page(t * 100 + i) for i in range(8)]
             for t in range(nthreads)]
    shared = [[comp.compress(p) for p in ps] for ps in pages]
    start = threading.Barrier(nthreads)
    failures, done = [], [0] * nthreads

    def work(t):
        try:
            start.wait()
            for r in range(rounds):
                i = r % 8
                page = pages[t][i]
                data = comp.compress(page)
                if data != shared[t][i]:
                    failures.append((t, r, "compress output differs"))
                if comp.decompress(data, slot=t) != page:
                    failures.append((t, r, "own page"))
                other = (t + 1 + r) % nthreads
                if comp.decompress(shared[other][i], slot=other) != pages[other][i]:
                    failures.append((t, r, "other thread's page"))
                done[t] += 1
        except Exception as e:  # reported below, with the thread
            failures.append((t, "raised", repr(e)))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in threads)
    assert failures == []
    assert done == [rounds] * nthreads


def test_zstd_contexts_are_pooled_not_per_thread():
    # nbdkit runs up to 16 threads per connection: contexts are as many as
    # calls ever ran at once, not one pair per thread.
    comp = compress.create("zstd")
    page = _real_pages()[0]
    results = []
    for _ in range(20):
        th = threading.Thread(
            target=lambda: results.append(comp.decompress(comp.compress(page))))
        th.start()
        th.join()
    assert results == [page] * 20
    # Each call took a context from the free list and gave it back.
    assert comp.native.free_contexts == (1, 1)
    assert comp.decompress(comp.compress(page)) == page
