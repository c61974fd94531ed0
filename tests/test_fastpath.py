"""Tests for zramd._fastpath: the device's requests in C (csrc/zram.c,
through ``Zram``), the pool's error paths (zramd/csrc/zsmalloc.c, through
its Python type), and the native codecs.

What the device does is checked against the model of the device
(tests/device_model.py, test_device_model.py), on C requests and on
``native=False`` devices alike.  What is left here is what only the C
requests and their glue have: where a request hands a sector back to the
Python paths, and what it leaves behind when it does; argument checks;
locks, the codec lock and close during a request; the crew and a fork;
the pool's and the codecs' error paths.  A case that must hold on both
faces runs on a pair of devices (C requests, Python paths), each checked
on its own (``assert_sound``: mm_stat adds up, one pool object per slot,
the pool's audit):

    hand-made        a sector the C loop must hand back in the middle of a
                     request: over mem_limit, recompressed with a
                     secondary algorithm, a trained dictionary (and a
                     retirement, which waits for the request: a stripe
                     lock held by the test stops it half-way), a corrupt
                     object, a written-back slot, a codec with no native
                     form (lzo, lzo-rle); the huge line
    threads          overlapping multi-sector I/O with compaction and the
                     deferred-free drain; every sector ends as one of the
                     pages written to it, counters add up
    pool             malloc / free error paths: exact messages, nothing
                     changed, no class lock left held
    codecs           lz4 block interchange with python-lz4, zstd context
                     free lists, deflate byte for byte Python's zlib (its
                     output at every level, what its decoder refuses)
    fork             multi-sector requests in a child forked after the
                     crew of helper threads started

Which sectors went to the Python path is observed by wrapping the
device's ``_read_sector`` / ``_write_sector`` (instance attributes win
over the class's), so a test can say the C loop stopped at exactly the
sector it must and nowhere else.

Four tests began as reports of bugs in the C loops: zstd pages a few
bytes under huge_class_size stored raw (the output buffer was capped at
the line), a dictionary id retired and reused while a write was between
compression and its slot lock (the page became unreadable), the same
between two sectors of one read (the batch's codec decoded the new
dictionary's page into other bytes), and a corrupt sector leaving it and
the sectors after it touched (IDLE cleared).  A forked child, as under
nbdkit, must get helper threads of its own.
"""

import errno
import os
import random
import struct
import sys
import sysconfig
import threading
import time
import zlib

import lz4.block
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import race
from zramd import _fastpath, compress
from zramd.device import HUGE, IDLE, N_STRIPES, SAME, WB, Device
from zramd.errors import CorruptDataError, NoSpaceError, ZramdError
from zramd._fastpath import HANDLE_CLASS_BITS
from zramd.zsmalloc import Pool

PAGE = 4096
# zstd contexts one request may hold: its own and one per crew helper
# (csrc/crew.c starts min(online CPUs, 8) helpers).
CONTEXTS_MAX = 1 + min(max(os.sysconf("SC_NPROCESSORS_ONLN"), 1), 8)


# --------------------------------------------------------------------------
# Pages.

WORDS = [b"swap", b"zram", b"page", b"kernel", b"memory", b"slot",
         b"handle", b"class", b"frame", b"zspage", b"\n"]


def text_page(seed):
    """Compressible text, different for every seed."""
    r = random.Random(seed)
    out = b" ".join(r.choice(WORDS) + b"%d" % r.randrange(100)
                    for _ in range(700))
    return out[:PAGE].ljust(PAGE, b".")


def random_page(seed):
    """Incompressible: stored HUGE."""
    return random.Random(seed).randbytes(PAGE)


def same_page(seed):
    """One 8-byte word repeated: a SAME slot, no pool object."""
    return random.Random(seed).randbytes(8) * (PAGE // 8)


def half_page(seed):
    """Half to three quarters random: compresses, but not by much."""
    r = random.Random(seed)
    n = r.randrange(PAGE // 2, PAGE * 3 // 4)
    return r.randbytes(n) + bytes(PAGE - n)


def near_huge_page(seed):
    """3300..3999 random bytes, then zeroes: compresses to either side
    of huge_class_size (3625 with chain_size 8)."""
    n = 3300 + seed % 700
    return random.Random(seed).randbytes(n) + bytes(PAGE - n)


PAGE_KINDS = {
    "zero": lambda seed: bytes(PAGE),
    "same": same_page,
    "text": text_page,
    "random": random_page,
    "half": half_page,
    "near_huge": near_huge_page,
}


def make_page(kind, seed):
    return PAGE_KINDS[kind](seed)


def make_bytes(kind, seed, n):
    """``n`` bytes of a kind, for unaligned writes."""
    if kind == "zero":
        return bytes(n)
    if kind == "same":
        return (random.Random(seed).randbytes(8) * (n // 8 + 1))[:n]
    pages = -(-n // PAGE)
    return b"".join(make_page(kind, seed + i) for i in range(pages))[:n]


# --------------------------------------------------------------------------
# Helpers.

def pair(size, **kw):
    """(C requests, Python paths): two devices of one configuration, for
    a case that must hold on both (the Python paths are what the C
    requests hand back to; device_model.py is the reference of both)."""
    return (Device(size, native=True, **kw), Device(size, native=False, **kw))


def close_all(*devs):
    for dev in devs:
        dev.close()


def python_path_calls(dev):
    """Record the sector indices the device sends to its Python paths (a
    read-modify-write's under "write", its read under "read" too)."""
    calls = {"read": [], "write": []}
    read_sector, write_sector = dev._read_sector, dev._write_sector
    patch_sector = dev._patch_sector

    def read(index, *args, **kw):
        calls["read"].append(index)
        return read_sector(index, *args, **kw)

    def write(index, page):
        calls["write"].append(index)
        return write_sector(index, page)

    def patch(index, lo, data):
        calls["write"].append(index)
        return patch_sector(index, lo, data)

    dev._read_sector = read
    dev._write_sector = write
    dev._patch_sector = patch
    return calls


def slot_words(dev):
    return [dev.slot_info(i) for i in range(dev.nr_pages)]


def assert_sound(*devs):
    """Each device on its own: mm_stat adds up to its slots, its pool
    holds one object per slot that has one and passes its audit."""
    for dev in devs:
        check_identities(dev)
        dev.pool.audit()


def check_identities(dev):
    """mm_stat adds up to what the slots hold, and the pool holds exactly
    one object per slot that has one (no leak, no double count)."""
    stored = same = huge = compr = objects = 0
    for i in range(dev.nr_pages):
        info = dev.slot_info(i)
        if not dev.slot_allocated(i):
            assert (info.flags, info.size) == (0, 0), (i, info)
            continue
        stored += 1
        if info.flags & SAME:
            same += 1
        elif not info.flags & WB:
            objects += 1
            compr += info.size
            huge += bool(info.flags & HUGE)
    mm = dev.mm_stat()
    assert mm.orig_data_size == stored * PAGE
    assert mm.compr_data_size == compr
    assert (mm.same_pages, mm.huge_pages) == (same, huge)
    assert mm.mem_used_total == dev.pool.total_pages() * PAGE
    assert sum(c.obj_used for c in dev.pool.stats().classes) == objects


def read_guarded(dev, offset, length):
    """read_into a window of a larger buffer; the bytes around the window
    must stay untouched (the C loop writes straight into it)."""
    guard = b"\xee" * PAGE
    buf = bytearray(guard + b"\xdd" * length + guard)
    dev.read_into(offset, memoryview(buf)[PAGE:PAGE + length])
    assert buf[:PAGE] == guard and buf[PAGE + length:] == guard
    return bytes(buf[PAGE:PAGE + length])


# --------------------------------------------------------------------------
# (1) The huge line and a codec with no C form.

def near_huge_pages(comp, huge_class_size, below=12):
    """{compressed size: page} for sizes in [huge_class_size - below,
    huge_class_size + 8]: a random prefix (any bytes, or bytes of a small
    alphabet, which zstd's entropy coder shrinks) and zeroes after."""
    found = {}
    lo = huge_class_size - below
    for alphabet in (256, 128, 160, 180, 200, 220, 240):
        rng = random.Random(alphabet)
        full = bytes(rng.randrange(alphabet) for _ in range(PAGE))
        for n in range(2800, PAGE + 1):
            page = full[:n] + bytes(PAGE - n)
            size = len(comp.compress(page))
            if lo <= size <= huge_class_size + 8:
                found.setdefault(size, page)
            elif size > huge_class_size + 64:
                break
    return found


@pytest.mark.parametrize("algorithm", ["lz4", "lz4hc", "zstd", "deflate"])
def test_huge_line_is_the_same_in_c_and_python(algorithm):
    """A page is HUGE iff its compressed size reaches huge_class_size, in
    the C loop as in _try_write_sector (and zram).  The pages just under
    the line are where a capped output buffer decides otherwise: zstd
    wants about 8 bytes of room beyond its output, so with a capacity of
    huge_class_size - 1 pages of 3617..3624 bytes were stored raw (and
    zlib ends a stream only with a byte of room to spare)."""
    c, py = pair(32 * PAGE, algorithm=algorithm)
    try:
        hcs = c.pool.huge_class_size
        pages = near_huge_pages(c._compressor, hcs)
        sizes = sorted(pages)
        # Not vacuous: pages on both sides of the line and just under it.
        assert sizes[-1] >= hcs and len([s for s in sizes if s < hcs]) >= 3, \
            sizes
        data = b"".join(pages[s] for s in sizes)
        for dev in (c, py):
            dev.write(0, data)
        want = [(HUGE, PAGE) if s >= hcs else (0, s) for s in sizes]
        assert [(i.flags, i.size) for i in slot_words(py)[:len(sizes)]] \
            == want
        assert [(i.flags, i.size) for i in slot_words(c)[:len(sizes)]] \
            == want, dict(zip(sizes, slot_words(c)))
        assert_sound(c, py)
        assert c.read(0, len(data)) == data
    finally:
        close_all(c, py)


@pytest.mark.parametrize("algorithm", ["lzo", "lzo-rle"])
def test_lzo_has_no_native_codec_and_goes_through_python(algorithm):
    """A primary with no native form: every stored sector is the Python
    path's, in both directions; SAME and holes stay in C."""
    c, py = pair(16 * PAGE, algorithm=algorithm)
    try:
        calls = python_path_calls(c)
        kinds = ["text", "same", "random", "zero", "text", "half"]
        data = b"".join(make_page(k, i) for i, k in enumerate(kinds))
        for dev in (c, py):
            dev.write(PAGE, data)
        # Writes: the C loop declines a primary with no codec outright.
        assert calls["write"] == list(range(1, 1 + len(kinds)))
        for dev in (c, py):
            assert read_guarded(dev, 0, 8 * PAGE) == bytes(PAGE) + data \
                + bytes(PAGE)
        # Reads: only the sectors holding an lzo object (or a raw HUGE
        # page, which C copies itself).
        assert calls["read"] == [1 + i for i, k in enumerate(kinds)
                                 if k in ("text", "half")]
        assert_sound(c, py)
    finally:
        close_all(c, py)


@pytest.mark.parametrize("level", [1, 6, 9])
def test_deflate_stays_in_c(level):
    """deflate has a C form (csrc/backend_deflate.c): the C requests hand
    nothing back, and store what the Python paths store, object for
    object (the same bytes, so the same sizes and mm_stat)."""
    c, py = pair(16 * PAGE, algorithm="deflate", level=level)
    try:
        calls = python_path_calls(c)
        kinds = ["text", "same", "random", "zero", "text", "half",
                 "near_huge", "near_huge"]
        data = b"".join(make_page(k, i) for i, k in enumerate(kinds))
        for dev in (c, py):
            dev.write(PAGE, data)
            dev.write(10 * PAGE, data[:PAGE])       # one sector alone
        for dev in (c, py):
            assert read_guarded(dev, 0, 12 * PAGE) == bytes(PAGE) + data \
                + bytes(PAGE) + data[:PAGE] + bytes(PAGE)
            assert read_guarded(dev, 10 * PAGE, PAGE) == data[:PAGE]
        assert calls == {"read": [], "write": []}
        assert [(i.flags, i.size) for i in slot_words(c)] \
            == [(i.flags, i.size) for i in slot_words(py)]
        assert c.mm_stat() == py.mm_stat()
        assert_sound(c, py)
    finally:
        close_all(c, py)


# --------------------------------------------------------------------------
# (2) Sectors the C loop hands back in the middle of a request.

@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_mem_limit_reached_part_way(algorithm):
    limit = 24
    c, py = pair(64 * PAGE, algorithm=algorithm, mem_limit=limit * PAGE)
    try:
        calls = python_path_calls(c)
        n = 32
        old = [same_page(1000 + i) for i in range(n)]
        kinds = ["text", "same", "text", "random", "zero", "half"] + [
            "random"] * (n - 6)
        data = [make_page(k, i) for i, k in enumerate(kinds)]
        for dev in (c, py):
            dev.write(0, b"".join(old))         # costs no pool memory
        failed = []
        for dev in (c, py):
            with pytest.raises(NoSpaceError) as e:
                dev.write(0, b"".join(data))
            failed.append(int(e.value.message.split("sector ")[1]
                              .split(":")[0]))
        at = failed[0]
        assert failed == [at, at]
        assert 6 < at < n, "the limit must stop the request part way"
        # The C loop stopped once, at that sector, for Python to raise.
        assert calls["write"] == [at]
        for dev in (c, py):
            assert dev.io_stat().failed_writes == 1
            assert dev.num_writes == n + at
            # Stored up to the failing sector; from there on the old pages.
            assert dev.read(0, n * PAGE) == b"".join(data[:at] + old[at:])
            assert dev.pool.total_pages() <= limit
            check_identities(dev)
        assert_sound(c, py)
        if algorithm == "zstd":
            assert c._compressor.native.free_contexts[0] <= CONTEXTS_MAX
        # Room again: the rest of the request goes through.
        for dev in (c, py):
            dev.set_mem_limit(0)
            dev.write(at * PAGE, b"".join(data[at:]))
            assert dev.read(0, n * PAGE) == b"".join(data)
        assert_sound(c, py)
    finally:
        close_all(c, py)


def test_recompressed_slots_inside_one_read_and_write():
    """Sectors of a secondary algorithm, with a C form (zstd) or without
    (lzo), are the Python paths' in a C read; a C write over them frees
    their objects."""
    c, py = pair(16 * PAGE, algorithm="lz4")
    try:
        data = [text_page(i) for i in range(8)]
        for dev in (c, py):
            dev.write(0, b"".join(data))
            dev.set_recomp_algorithm("zstd", 1, level=9)
            dev.set_recomp_algorithm("lzo", 2)
            assert dev.recompress(pages=[3], priority=1) == 1
            assert dev.recompress(pages=[5], priority=2) == 1
        assert [c.slot_info(i).priority for i in range(8)] == \
            [0, 0, 0, 1, 0, 2, 0, 0]
        calls = python_path_calls(c)
        for dev in (c, py):
            assert read_guarded(dev, 0, 8 * PAGE) == b"".join(data)
        assert calls["read"] == [3, 5]
        assert_sound(c, py)
        # A C write over them frees the secondary algorithms' objects.
        new = [text_page(100 + i) for i in range(8)]
        for dev in (c, py):
            dev.write(0, b"".join(new))
            assert dev.read(0, 8 * PAGE) == b"".join(new)
            check_identities(dev)
        assert calls["write"] == []
        assert {c.slot_info(i).priority for i in range(8)} == {0}
        # ... and the C loop counts them out of their priorities, so
        # recomp_algorithm may change again.
        for dev in (c, py):
            assert (dev._prio_pages(1), dev._prio_pages(2)) == (0, 0)
            dev.set_recomp_algorithm("lz4hc", 1)
        assert_sound(c, py)
    finally:
        close_all(c, py)


def dictionary_changes(dev, first, n):
    """Compressed sectors whose dictionary differs from that of the
    compressed sector before them."""
    out, prev = set(), None
    for i in range(first, first + n):
        info = dev.slot_info(i)
        if not dev.slot_allocated(i) or info.flags & (SAME | HUGE | WB):
            continue
        if prev is not None and info.dict_id != prev:
            out.add(i)
        prev = info.dict_id
    return out


def stored_text(dev, first, n, seed):
    data = [text_page(seed + i) for i in range(n)]
    dev.write(first * PAGE, b"".join(data))
    return data


def test_trained_dictionary_pages_mixed_in_one_request():
    c, py = pair(96 * PAGE, algorithm="zstd")
    try:
        model = bytearray(96 * PAGE)
        for dev in (c, py):
            stored_text(dev, 0, 40, 0)
        model[:40 * PAGE] = b"".join(text_page(i) for i in range(40))
        ids = [dev.train_dictionary(dict_size=2048) for dev in (c, py)]
        assert ids == [1, 1]
        # Every other sector rewritten: dictionary 0 and 1 alternate, plus
        # SAME and HUGE pages that carry no dictionary.
        for i in range(0, 40, 2):
            kind = ("text", "text", "same", "random")[i // 2 % 4]
            page = make_page(kind, 500 + i)
            for dev in (c, py):
                dev.write(i * PAGE, page)
            model[i * PAGE:(i + 1) * PAGE] = page
        # And one multi-sector write past the old pages.
        more = b"".join(text_page(900 + i) for i in range(12))
        for dev in (c, py):
            dev.write(40 * PAGE, more)
        model[40 * PAGE:52 * PAGE] = more
        dict_of = [c.slot_info(i).dict_id for i in range(52)]
        assert dict_of[1:40:2] == [0] * 20
        assert set(dict_of[40:52]) == {1}
        assert {dict_of[i] for i in range(0, 40, 8)} == {1}
        calls = python_path_calls(c)
        # One dictionary in the request: all of it in C.
        for dev in (c, py):
            assert read_guarded(dev, 40 * PAGE, 12 * PAGE) == \
                model[40 * PAGE:52 * PAGE]
        assert calls["read"] == []
        # Both dictionaries in one request.
        for dev in (c, py):
            assert read_guarded(dev, 0, 96 * PAGE) == model
            assert dev.dictionary_ids() == [0, 1]
            assert dev.dictionary_id() == 1
        # The C loop decompresses a request with one codec; what it may
        # hand to Python is a sector of another dictionary than the
        # stored sector before it (and nothing else).
        assert set(calls["read"]) <= dictionary_changes(c, 0, 96)
        assert_sound(c, py)
        for comp in (c._compressor, c._dict_comps[1]):
            assert 1 <= comp.native.free_contexts[1] <= CONTEXTS_MAX
        # A second dictionary; once no page uses the first, it is retired.
        for dev in (c, py):
            assert dev.train_dictionary(dict_size=4096) == 2
            for i in range(52):
                if dev.slot_info(i).dict_id == 1:
                    dev.write(i * PAGE, model[i * PAGE:(i + 1) * PAGE])
            dev.pool.free_deferred_flush()
            assert dev.train_dictionary(dict_size=2048) == 1
            assert dev.dictionary_ids() == [0, 1, 2]
            assert dev.read(0, 96 * PAGE) == model
        assert_sound(c, py)
    finally:
        close_all(c, py)


def hook_between_compress_and_store(dev, action):
    """Run ``action`` once, inside the Python write path after the page
    was compressed and allocated and before its slot lock is taken: it
    reports the pool's size through _note_pages_used there.  (The C path
    calls nothing of Python's: see block_inside_c_request.)"""
    fired = []
    note = dev._note_pages_used

    def hooked(pages):
        if not fired:
            fired.append(pages)
            action()
        note(pages)

    dev._note_pages_used = hooked
    return fired


def block_inside_c_request(dev, sector, request):
    """Run ``request`` (a call of dev) in a thread whose C request stops
    at ``sector``: the test holds that sector's stripe lock until the
    returned ``go()``; the request then holds the slot table's codec lock
    (read) and waits.  Returns (go, thread); go() joins it."""
    lock = dev._stripe_locks[sector % N_STRIPES]
    lock.acquire()
    worker = threading.Thread(target=request)
    worker.start()
    deadline = time.monotonic() + 10
    while not dev._zram.busy:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    time.sleep(0.05)                    # into the codec lock, at the stripe

    def go():
        lock.release()
        worker.join(10)
        assert not worker.is_alive()
    return go, worker


def test_dictionary_retired_meanwhile_goes_to_python():
    """Python path: the write compressed with dictionary 1; before it
    stores, another dictionary becomes current and 1 is retired: the
    sector is compressed again with 2.  C path: a retirement waits for a
    write in progress (the codec lock), so the write's pages keep 1,
    which is then not retired; both read back."""
    new = [text_page(700 + i) for i in range(6)]
    py = Device(64 * PAGE, algorithm="zstd", native=False)
    c = Device(64 * PAGE, algorithm="zstd")
    try:
        stored_text(py, 0, 32, 0)
        assert py.train_dictionary(dict_size=2048) == 1

        def retire():
            assert py.train_dictionary(dict_size=4096) == 2
            py._retire_dictionaries()
            assert py.dictionary_ids() == [0, 2]

        fired = hook_between_compress_and_store(py, retire)
        py.write(40 * PAGE, b"".join(new))
        assert fired
        assert [py.slot_info(40 + i).dict_id for i in range(6)] == [2] * 6
        assert py.read(40 * PAGE, 6 * PAGE) == b"".join(new)
        assert py.dictionary_ids() == [0, 2]

        stored_text(c, 0, 32, 0)
        assert c.train_dictionary(dict_size=2048) == 1
        calls = python_path_calls(c)
        go, _ = block_inside_c_request(
            c, 40, lambda: c.write(40 * PAGE, b"".join(new)))
        trainer = threading.Thread(
            target=lambda: c.train_dictionary(dict_size=4096))
        trainer.start()
        time.sleep(0.05)
        assert trainer.is_alive()       # waits for the write
        go()
        trainer.join(10)
        assert not trainer.is_alive()
        assert [c.slot_info(40 + i).dict_id for i in range(6)] == [1] * 6
        assert c.dictionary_id() == 2
        c._retire_dictionaries()
        assert c.dictionary_ids() == [0, 1, 2]
        assert c.read(40 * PAGE, 6 * PAGE) == b"".join(new)
        assert calls["write"] == []
        check_identities(c)
    finally:
        close_all(c, py)


@pytest.mark.parametrize("native", [True, False])
def test_dictionary_id_reused_meanwhile(native):
    """As above, but a second training retires 1 and hands its id to a
    new dictionary before the write stores: the page must not be stored
    under an id that now names another dictionary (a store that checked
    only that the id is still known made every such page unreadable).
    In C the trainings wait for the write instead."""
    dev = Device(64 * PAGE, algorithm="zstd", native=native)
    try:
        stored_text(dev, 0, 32, 0)
        assert dev.train_dictionary(dict_size=2048) == 1

        def retrain():
            assert dev.train_dictionary(dict_size=4096) == 2
            assert dev.train_dictionary(dict_size=3000) == (
                1 if not native else 3)

        new = [text_page(700 + i) for i in range(4)]
        if native:
            go, _ = block_inside_c_request(
                dev, 40, lambda: dev.write(40 * PAGE, b"".join(new)))
            errors = []

            def trainer_run():
                try:
                    retrain()
                except BaseException as e:      # noqa: B902
                    errors.append(e)

            trainer = threading.Thread(target=trainer_run)
            trainer.start()
            go()
            trainer.join(10)
            assert not trainer.is_alive() and not errors, errors
            assert dev.dictionary_ids() == [0, 1, 2, 3]
        else:
            fired = hook_between_compress_and_store(dev, retrain)
            dev.write(40 * PAGE, b"".join(new))
            assert fired and dev.dictionary_ids() == [0, 1, 2]
        assert dev.read(40 * PAGE, 4 * PAGE) == b"".join(new)
    finally:
        dev.close()


def test_dictionary_id_reused_between_two_sectors_of_a_read(monkeypatch):
    """A multi-sector read decompresses with one codec, found for the
    first sector's dictionary id.  If that id were retired and handed to
    a new dictionary between two sectors of the read, a later sector with
    the same id would be of the new dictionary: reusing the batch's codec
    for it (on the id alone) returned the wrong bytes, with no error
    (raw-content dictionaries of one size decode each other's frames).
    The codec lock makes the retirement wait for the read: it returns
    what the slots held when it began."""
    import zstandard
    rng = random.Random(8)
    raw = [rng.randbytes(8192) for _ in range(3)]   # trainings 1, 2, 3
    trained = iter(raw)

    class Trained:
        def __init__(self, data):
            self.data = data

        def as_bytes(self):
            return self.data

    monkeypatch.setattr(zstandard, "train_dictionary",
                        lambda size, samples: Trained(next(trained)))
    dev = Device(64 * PAGE, algorithm="zstd")
    try:
        stored_text(dev, 16, 32, 0)
        assert dev.train_dictionary() == 1
        # Sectors 0 and 1: pages of dictionary 1 (raw content raw[0]).
        old = [raw[0][:PAGE], raw[0][PAGE:2 * PAGE]]
        dev.write(0, b"".join(old))
        assert [dev.slot_info(i).dict_id for i in (0, 1)] == [1, 1]
        new = raw[2][:PAGE]

        def retire_and_reuse():
            # Between the read's sectors 0 and 1: dictionary 2, no page of
            # 1 left, so the next training retires 1 and reuses its id.
            assert dev.train_dictionary() == 2
            dev.write(0, text_page(100) + text_page(101))
            assert dev.train_dictionary() == 1
            dev.write(PAGE, new)
            assert dev.slot_info(1).dict_id == 1

        out = bytearray(2 * PAGE)
        go, _ = block_inside_c_request(dev, 1, lambda: dev.read_into(0, out))
        trainer = threading.Thread(target=retire_and_reuse)
        trainer.start()
        go()
        trainer.join(10)
        assert not trainer.is_alive()
        assert out == old[0] + old[1]
        assert dev.read(0, 2 * PAGE) == text_page(100) + new
    finally:
        dev.close()


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_corrupt_object_inside_a_read(algorithm):
    c, py = pair(16 * PAGE, algorithm=algorithm)
    try:
        data = [text_page(i) for i in range(6)]
        calls = python_path_calls(c)
        errors = []
        for dev in (c, py):
            dev.write(0, b"".join(data))
            info = dev.slot_info(3)
            assert not info.flags & (HUGE | SAME)
            dev.pool.obj_write(dev._zram.get(3)[1], b"\xff" * info.size)
            assert dev.mark_idle() == 6
            buf = bytearray(6 * PAGE)
            with pytest.raises(CorruptDataError) as e:
                dev.read_into(0, buf)
            errors.append(str(e.value))
            assert "%s decompress: slot 3: " % algorithm in str(e.value)
            assert dev.io_stat().failed_reads == 1
            # Counted: the three sectors read before it, not it.
            assert dev.num_reads == 3
            assert buf[:3 * PAGE] == b"".join(data[:3])
            assert [bool(dev.slot_info(i).flags & IDLE)
                    for i in range(6)] == [False] * 3 + [True] * 3
            # The sectors after it still read, one request later.
            assert dev.read(4 * PAGE, 2 * PAGE) == b"".join(data[4:])
            assert dev.num_reads == 5
        assert errors[0] == errors[1]
        assert calls["read"] == [3]
        assert_sound(c, py)
        if algorithm == "zstd":
            assert 1 <= c._compressor.native.free_contexts[1] <= CONTEXTS_MAX
    finally:
        close_all(c, py)


def test_two_corrupt_objects_in_a_request_the_crew_decompresses():
    """The C read copies and touches every sector of a request first and
    decompresses afterwards, several chunks at once: with two corrupt
    objects the request must fail at the lower one whichever chunk fails
    first, and leave it and every sector after it (compressed, SAME,
    HUGE) untouched, as the Python path and zram_bio_read do."""
    n = 24
    c, py = pair(n * PAGE, algorithm="zstd")
    try:
        kinds = ("text", "same", "random", "text", "half", "text")
        data = [make_page(kinds[i % len(kinds)], i) for i in range(n)]
        for i in (5, 14):
            data[i] = bytes(PAGE)
        for dev in (c, py):
            dev.write(0, b"".join(data))
            for i in (5, 14):
                dev.discard(i * PAGE, PAGE)     # holes
            dev.pool.free_deferred_flush()
            for i in (10, 17):
                info = dev.slot_info(i)
                assert not info.flags & (HUGE | SAME)
                dev.pool.obj_write(dev._zram.get(i)[1], b"\xff" * info.size)
        # Sectors holding an object (mark_idle leaves holes and
        # same-filled sectors alone).
        held = [i for i in range(n)
                if i not in (5, 14) and kinds[i % len(kinds)] != "same"]
        for rep in range(1, 9):
            for dev in (c, py):
                # All of them at first; then those the failed read touched,
                # 0..9, and no other.
                assert dev.mark_idle() == (
                    len(held) if rep == 1 else len([i for i in held if i < 10]))
                with pytest.raises(CorruptDataError, match="slot 10: "):
                    dev.read(0, n * PAGE)
                assert dev.io_stat().failed_reads == rep
                assert dev.num_reads == 10 * rep
            assert_sound(c, py)
        assert [bool(c.slot_info(i).flags & IDLE) for i in range(n)] == [
            False] * 10 + [i in held for i in range(10, n)]
        assert c.read(18 * PAGE, 6 * PAGE) == b"".join(data[18:])
    finally:
        close_all(c, py)


def test_written_back_slots_inside_one_read_and_write(tmp_path):
    devs = []
    try:
        for native in (True, False):
            path = tmp_path / ("backing-%d.img" % native)
            with open(path, "wb") as f:
                f.truncate(32 * PAGE)
            path.chmod(0o600)
            devs.append(Device(16 * PAGE, algorithm="lz4", native=native,
                               backing_dev=str(path)))
        c, py = devs
        data = [text_page(i) for i in range(4)] + [random_page(4)] + [
            text_page(i) for i in range(5, 8)]
        for dev in devs:
            dev.write(0, b"".join(data))
            dev.mark_idle()
            assert dev.writeback("idle", pages=[2, 4, 6]) == 3
            assert dev.bd_stat().bd_count == 3
            assert [i for i in range(8) if dev.slot_info(i).flags & WB] \
                == [2, 4, 6]
        calls = python_path_calls(c)
        for dev in devs:
            assert read_guarded(dev, 0, 8 * PAGE) == b"".join(data)
            assert dev.bd_stat().bd_reads == 3
        # C reads the blocks itself.
        assert calls["read"] == []
        assert_sound(c, py)
        # A multi-sector write over them: the C loop leaves each WB slot
        # to Python, which frees its block.
        new = [text_page(50 + i) for i in range(8)]
        for dev in devs:
            dev.write(0, b"".join(new))
            assert dev.read(0, 8 * PAGE) == b"".join(new)
            assert dev.bd_stat().bd_count == 0
            check_identities(dev)
        assert calls["write"] == [2, 4, 6]
        assert_sound(c, py)
        assert c.bd_stat() == py.bd_stat()
    finally:
        close_all(*devs)


def test_zram_argument_checks():
    dev = Device(8 * PAGE, native=True)
    zram = dev._zram
    try:
        # (sys.maxsize, PAGE): first + count must not wrap round.
        for first, n in ((0, 4095), (-1, PAGE), (8, PAGE), (5, 4 * PAGE),
                         (sys.maxsize, PAGE), (sys.maxsize - 1, 2 * PAGE)):
            with pytest.raises(ValueError, match="not whole sectors"):
                zram.read(bytearray(n), first)
            with pytest.raises(ValueError, match="not whole sectors"):
                zram.write(bytes(n), first)
        with pytest.raises(TypeError):
            zram.read(bytes(PAGE), 0)           # not writable
        for bad in (-1, 8, sys.maxsize):
            with pytest.raises(IndexError):
                zram.get(bad)
        for bad in (-1, N_STRIPES):
            with pytest.raises(IndexError):
                zram.lock(bad)
        with pytest.raises(RuntimeError, match="needs lock_all"):
            zram.set_dict_codec(1, None)
        assert zram.write(text_page(1), 7) == 1
        out = bytearray(PAGE)
        assert zram.read(out, 7) == 1 and out == text_page(1)
        assert (dev.num_reads, dev.num_writes) == (1, 1)
    finally:
        dev.close()
    # Closed with the device: the slot table's maps are gone.
    with pytest.raises(ValueError, match="closed"):
        zram.read(bytearray(PAGE), 0)
    with pytest.raises(ValueError, match="closed"):
        zram.write(bytes(PAGE), 0)


def test_extents_and_discard_past_one_batch():
    """Zram.extents scans EXTENT_BATCH (1024) runs at a time and a discard
    hands the slot table DISCARD_BATCH (1024) sectors at a time: runs and
    counts must not depend on where a batch ends."""
    n = 3000
    kinds = ("hole", "zero", "data")            # sector i: kinds[i % 3]
    dev = Device(n * PAGE)
    try:
        for i in range(n):
            if i % 3:
                dev.write(i * PAGE, text_page(i) if i % 3 == 2
                          else bytes(PAGE))
        expected = [(i * PAGE, PAGE, kinds[i % 3]) for i in range(n)]
        assert dev.extents(0, n * PAGE) == expected
        for k in (1023, 1024, 1025, 2049):
            assert dev.extents(0, n * PAGE, k) == expected[:k]
        assert dev.extents(100, n * PAGE - 200)[0] == (100, PAGE - 100,
                                                       "hole")
        assert dev.mm_stat().orig_data_size == 2000 * PAGE
        dev.discard(PAGE, (n - 2) * PAGE)
        assert dev.io_stat().notify_free == n - 2
        assert dev.mm_stat().orig_data_size == PAGE
        assert dev.extents(0, n * PAGE) == [
            (0, (n - 1) * PAGE, "hole"), ((n - 1) * PAGE, PAGE, "data")]
        dev.pool.free_deferred_flush()
        check_identities(dev)
    finally:
        dev.close()


def test_zram_refuses_to_close_during_a_request():
    """A read waiting for a stripe lock runs without the GIL: closing its
    Zram then (the device's close) must refuse, not unmap the table under
    it."""
    dev = Device(8 * PAGE, native=True)
    try:
        dev.write(0, text_page(1) + text_page(2))
        out = bytearray(2 * PAGE)
        go, _ = block_inside_c_request(dev, 1, lambda: dev.read_into(0, out))
        try:
            with pytest.raises(BufferError, match="1 requests in progress"):
                dev._zram.close()
        finally:
            go()
        assert out == text_page(1) + text_page(2)
    finally:
        dev.close()


# --------------------------------------------------------------------------
# (3) Threads: overlapping multi-sector requests, compaction, drains.

_TAG = struct.Struct("<HHI")             # sector, thread, version
_SAME_PAGES = 4                          # every 4th version: a SAME page


def tagged_page(index, tid, version):
    """A page only (index, tid, version) makes: SAME pages carry the tag
    as their fill word; others start with it."""
    tag = _TAG.pack(index, tid, version)
    kind = version % _SAME_PAGES
    if kind == 0:
        return tag * (PAGE // 8)
    seed = (index << 32) ^ (tid << 24) ^ version
    body = (text_page, random_page, half_page)[kind - 1](seed)
    return b"TAG!" + tag + body[12:]


def decode_page(page):
    """(index, tid, version) of a tagged page, or None for zeroes; raises
    AssertionError for anything else (a torn or foreign page)."""
    if page == bytes(PAGE):
        return None
    if page[:4] == b"TAG!":
        tag = _TAG.unpack_from(page, 4)
    else:
        tag = _TAG.unpack_from(page, 0)
    assert tagged_page(*tag) == page, "not a page anyone wrote: %r" % (
        page[:16],)
    return tag


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_threads_overlapping_requests_with_compaction(algorithm):
    n_threads, sectors, steps = 4, 48, 150
    dev = Device(sectors * PAGE, algorithm=algorithm, native=True)
    errors = []
    written = [set() for _ in range(sectors)]    # (tid, version) per sector
    discarded = set()
    totals = {"reads": 0, "writes": 0, "freed": 0}
    totals_lock = threading.Lock()
    done = threading.Event()

    def worker(tid):
        try:
            rng = random.Random(tid)
            mine = {"reads": 0, "writes": 0, "freed": 0}
            for version in range(1, steps + 1):
                first = rng.randrange(sectors)
                n = rng.randint(1, min(8, sectors - first))
                op = rng.random()
                if op < 0.5:
                    pages = [tagged_page(first + i, tid, version + i)
                             for i in range(n)]
                    for i in range(n):
                        written[first + i].add((tid, version + i))
                    dev.write(first * PAGE, b"".join(pages))
                    mine["writes"] += n
                elif op < 0.85:
                    got = dev.read(first * PAGE, n * PAGE)
                    mine["reads"] += n
                    for i in range(n):
                        tag = decode_page(got[i * PAGE:(i + 1) * PAGE])
                        if tag is not None and tag[0] != first + i:
                            raise AssertionError("sector %d holds sector"
                                                 " %d's page" % (first + i,
                                                                 tag[0]))
                else:
                    discarded.update(range(first, first + n))
                    dev.discard(first * PAGE, n * PAGE)
                    mine["freed"] += n
            with totals_lock:
                for key in totals:
                    totals[key] += mine[key]
        except BaseException as e:          # noqa: B902 -- report any
            errors.append((tid, e))

    def compactor():
        try:
            while not done.is_set():
                dev.compact()
                dev.pool.free_deferred_flush()
                time.sleep(0.002)
        except BaseException as e:          # noqa: B902
            errors.append(("compactor", e))

    threads = [threading.Thread(target=worker, args=(t,))
               for t in range(n_threads)]
    try:
        race(threads, threading.Thread(target=compactor), done)
        assert not errors, errors
        dev.pool.free_deferred_flush()
        final = dev.read(0, sectors * PAGE)
        for i in range(sectors):
            tag = decode_page(final[i * PAGE:(i + 1) * PAGE])
            if tag is None:
                assert i in discarded or not written[i], i
            else:
                assert tag[0] == i and tag[1:] in written[i], (i, tag)
        assert dev.num_writes == totals["writes"]
        assert dev.num_reads == totals["reads"] + sectors
        assert dev.io_stat().notify_free == totals["freed"]
        assert dev.io_stat().failed_reads == dev.io_stat().failed_writes == 0
        check_identities(dev)
        dev.pool.audit()
        if algorithm == "zstd":
            cctx, dctx = dev._compressor.native.free_contexts
            assert 1 <= cctx <= n_threads * CONTEXTS_MAX
            assert 1 <= dctx <= n_threads * CONTEXTS_MAX
    finally:
        dev.close()


def test_multi_sector_requests_in_a_forked_child():
    """nbdkit forks after the device is made: the helper threads that
    share a request's pages were started in the parent and do not exist
    in the child, which must start its own (or do the work alone) rather
    than wait for them."""
    dev = Device(64 * PAGE, algorithm="zstd", native=True)
    try:
        data = b"".join(make_page(("text", "half", "near_huge")[i % 3], i)
                        for i in range(32))
        dev.write(0, data)                  # the parent's helpers start
        assert dev.read(0, len(data)) == data
        pid = os.fork()
        if pid == 0:                        # the child: report by status
            status = 1
            try:
                new = data[::-1]
                dev.write(16 * PAGE, new)
                if (dev.read(16 * PAGE, len(new)) == new
                        and dev.read(0, 16 * PAGE) == data[:16 * PAGE]):
                    status = 0
            finally:
                os._exit(status)
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("the child hung on a multi-sector request")
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's own helpers still serve it.
        dev.write(0, data[::-1])
        assert dev.read(0, len(data)) == data[::-1]
    finally:
        dev.close()


# --------------------------------------------------------------------------
# (4) The pool's error paths (zramd/csrc/zsmalloc.c).
#
# tests/test_zsmalloc.py has the pool's state machine against its model;
# what is checked here is the argument checks and the refusals: each has
# its exact message, changes nothing, and leaves no class lock held.


def assert_pool_released(pool):
    """No class lock held: another thread can malloc and free in every
    class (a lock left held would block it)."""
    sizes = [c.size - 8 if c.objs_per_zspage > 1 else PAGE
             for c in pool.stats().classes]
    errors = []

    def probe():
        try:
            for size in sizes:
                pool.free(pool.malloc(size))
        except BaseException as err:    # noqa: B902 -- report any
            errors.append(err)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "a class lock was left held"
    assert not errors, errors


@pytest.fixture
def pool():
    p = Pool()
    yield p
    p.close()


@pytest.mark.parametrize("size", [0, -1, PAGE + 1, 1 << 20])
def test_malloc_bad_sizes(pool, size):
    want = "malloc: size %d; accepted: 1..4096" % size
    with pytest.raises(ValueError) as e:
        pool.malloc(size)
    assert str(e.value) == want
    assert pool.total_pages() == 0
    assert_pool_released(pool)
    pool.audit()


def merged_index(pool):
    """A class index that names no class (merged into a neighbour)."""
    real = {c.index for c in pool.stats().classes}
    return next(i for i in range(255) if i not in real)


def bad_handles(pool, live, freed):
    """Handles that are not allocated, each of a different kind."""
    cls_byte = live & 0xFF
    return {
        "double free": freed,
        "row 0": cls_byte,
        "row past the table": (1 << 20) << HANDLE_CLASS_BITS | cls_byte,
        "merged class": 1 << HANDLE_CLASS_BITS | merged_index(pool),
        "class byte 255": 1 << HANDLE_CLASS_BITS | 255,
    }


@pytest.mark.parametrize("what", ["double free", "row 0",
                                  "row past the table", "merged class",
                                  "class byte 255"])
@pytest.mark.parametrize("size", [100, PAGE])
def test_free_of_unallocated_handle(pool, what, size):
    live = pool.malloc(size)
    pool.obj_write(live, b"\x42" * size)
    freed = pool.malloc(size)
    pool.free(freed)
    handle = bad_handles(pool, live, freed)[what]
    before = pool.stats()
    with pytest.raises(ValueError) as e:
        pool.free(handle)
    assert str(e.value) == "free: handle %d is not allocated" % handle
    assert pool.stats() == before
    assert_pool_released(pool)
    pool.audit()
    # The class still works: the live object is intact and more
    # allocations, new zspages included, go through.
    local = bytearray(PAGE)
    view = pool.obj_read_begin(live, local)
    try:
        assert bytes(view) == b"\x42" * size
    finally:
        pool.obj_read_end(live, view)
    more = [pool.malloc(size) for _ in range(40)]
    pool.audit()
    for h in more + [live]:
        pool.free(h)
    assert pool.total_pages() == 0
    pool.audit()


def test_unallocated_handles_refused_everywhere(pool):
    """obj_write, obj_read_begin and free_deferred refuse a handle that
    is not allocated, naming the operation; an oversized write too."""
    h = pool.malloc(100)
    pool.free(h)
    local = bytearray(PAGE)
    for op, call in (("obj_write", lambda: pool.obj_write(h, b"x")),
                     ("obj_read_begin",
                      lambda: pool.obj_read_begin(h, local)),
                     ("free_deferred", lambda: pool.free_deferred(h))):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == "%s: handle %d is not allocated" % (op, h)
    h = pool.malloc(100)
    with pytest.raises(ValueError) as e:
        pool.obj_write(h, bytes(101))
    assert str(e.value) == "obj_write: 101 bytes into a 100-byte object"
    with pytest.raises(ValueError, match="local_copy"):
        pool.obj_read_begin(h, bytearray(100))
    pool.free(h)
    assert_pool_released(pool)
    pool.audit()


def test_closed_pool_refuses_and_open_read_blocks_close():
    """A read open (obj_read_begin without obj_read_end) keeps close()
    from unmapping the frames under it; once closed, every call says so."""
    p = Pool()
    h = p.malloc(300)
    local = bytearray(PAGE)
    view = p.obj_read_begin(h, local)
    with pytest.raises(BufferError):
        p.close()
    assert not p.closed
    p.obj_read_end(h, view)
    p.close()
    assert p.closed
    for call in (lambda: p.malloc(10), lambda: p.free(h),
                 lambda: p.total_pages(), lambda: p.compact()):
        with pytest.raises(ValueError, match="closed"):
            call()
    p.close()                       # again: nothing to do


POOL_OPS = st.lists(st.one_of(
    st.tuples(st.just("malloc"),
              st.one_of(st.integers(1, PAGE),
                        st.sampled_from([1, 24, 25, 3624, 3625, PAGE]))),
    st.tuples(st.just("free"), st.integers(0, 1 << 16)),
    st.tuples(st.just("bad free"), st.sampled_from(
        ["double free", "row 0", "row past the table", "merged class",
         "class byte 255"]), st.booleans()),
    st.tuples(st.just("rewrite"), st.integers(0, 1 << 16)),
    st.tuples(st.just("compact")),
), max_size=60)


@pytest.mark.parametrize("chain", [4, 8])
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(ops=POOL_OPS)
def test_pool_ops_with_refused_frees(chain, ops):
    """Random malloc / free / rewrite / compact with refused frees of
    every kind between them, against a dict model: each refusal has the
    exact message, changes nothing and leaves nothing held."""
    pool = Pool(chain_size=chain)
    live = {}
    freed = []
    tag = 0
    local = bytearray(PAGE)
    try:
        for op in ops:
            if op[0] == "malloc":
                h = pool.malloc(op[1])
                assert h not in live
                tag += 1
                live[h] = random.Random(tag).randbytes(op[1])
                pool.obj_write(h, live[h])
            elif op[0] in ("free", "rewrite") and live:
                h = sorted(live)[op[1] % len(live)]
                if op[0] == "free":
                    pool.free(h)
                    del live[h]
                    freed.append(h)
                else:
                    tag += 1
                    live[h] = random.Random(tag).randbytes(len(live[h]))
                    pool.obj_write(h, live[h])
            elif op[0] == "bad free" and live:
                h = bad_handles(pool, sorted(live)[0], 0)[op[1]]
                if op[1] == "double free":
                    dead = [f for f in freed if f not in live]
                    if not dead:
                        continue
                    h = dead[-1]
                before = pool.stats()
                with pytest.raises(ValueError) as e:
                    if op[2]:
                        pool.free(h)
                    else:
                        pool.free_deferred(h)
                assert str(e.value) == "%s: handle %d is not allocated" % (
                    "free" if op[2] else "free_deferred", h)
                assert pool.stats() == before
            elif op[0] == "compact":
                pool.compact()
        assert_pool_released(pool)
        pool.audit()
        for h, data in live.items():
            view = pool.obj_read_begin(h, local)
            try:
                assert bytes(view) == data, h
            finally:
                pool.obj_read_end(h, view)
        for h in list(live):
            pool.free(h)
        assert pool.total_pages() == 0
        pool.audit()
    finally:
        pool.close()


# --------------------------------------------------------------------------
# (5) Codecs.

CODEC_PAGES = [text_page(1), half_page(2), random_page(3), same_page(4),
               bytes(PAGE)]


@pytest.mark.parametrize("level", [1, 9, 12])
def test_lz4hc_output_is_lz4_blocks_python_lz4_reads(level):
    codec = _fastpath.Codec("lz4hc", level)
    plain = _fastpath.Codec("lz4")
    for page in CODEC_PAGES:
        data = codec.compress(page)
        assert lz4.block.decompress(data, uncompressed_size=PAGE) == page
        assert plain.decompress(data) == page
        # And the other way: python-lz4's high-compression blocks.
        theirs = lz4.block.compress(page, mode="high_compression",
                                    compression=level, store_size=False)
        assert codec.decompress(theirs) == page


@pytest.mark.parametrize("mode", ["default", "fast", "high_compression"])
def test_lz4_codec_reads_python_lz4_blocks(mode):
    codec = _fastpath.Codec("lz4")
    for page in CODEC_PAGES:
        data = lz4.block.compress(page, mode=mode, store_size=False)
        assert codec.decompress(data) == page
        ours = codec.compress(page)
        assert lz4.block.decompress(ours, uncompressed_size=PAGE) == page
    # Not a page: python-lz4's block of 4095 bytes is refused as short.
    with pytest.raises(ValueError, match="short block"):
        codec.decompress(lz4.block.compress(bytes(PAGE - 1),
                                            store_size=False))


def test_zstd_contexts_stay_one_each_sequentially():
    codec = _fastpath.Codec("zstd", 3)
    assert codec.free_contexts == (0, 0)
    for i in range(50):
        page = CODEC_PAGES[i % len(CODEC_PAGES)]
        assert codec.decompress(codec.compress(page)) == page
        assert codec.free_contexts == (1, 1)
    with pytest.raises(ValueError):
        codec.decompress(b"\xff" * 100)
    assert codec.free_contexts == (1, 1)
    # Through a device: one context for a single sector; a request of
    # several takes one per crew hand, and gives every one back.
    dev = Device(32 * PAGE, algorithm="zstd", native=True)
    try:
        native = dev._compressor.native
        for _ in range(3):
            dev.write(PAGE, text_page(9))
            assert dev.read(PAGE, PAGE) == text_page(9)
            assert native.free_contexts == (1, 1)
        data = b"".join(CODEC_PAGES * 4)
        seen = []
        for _ in range(4):
            dev.write(0, data)
            assert dev.read(0, len(data)) == data
            seen.append(native.free_contexts)
        # As many as ever ran at once, and no more after the first round:
        # none is lost or made twice.
        assert seen == [seen[0]] * 4, seen
        assert all(1 <= n <= CONTEXTS_MAX for n in seen[0]), seen
        assert native.decompress(native.compress(data[:PAGE])) == data[:PAGE]
        assert native.free_contexts == seen[0]
    finally:
        dev.close()


# deflate: csrc/backend_deflate.c must write what the Python backend wrote
# (zlib.compress(page, level, -12)), or compressed sizes, huge pages and
# mm_stat would change, and refuse what its decoder refused.

def deflate_corpus():
    """Pages of files every machine running these tests has, the same on
    every run of one Python release: standard-library modules, the
    interpreter's binary; and the hand-made pages above."""
    stdlib = sysconfig.get_paths()["stdlib"]
    pages = list(CODEC_PAGES) + [near_huge_page(s) for s in (0, 350, 699)]
    files = [(os.path.join(stdlib, name), count) for name, count in (
        ("argparse.py", 12), ("typing.py", 12), ("decimal.py", 8),
        ("pickle.py", 8))] + [(os.path.realpath(sys.executable), 24)]
    for path, count in files:
        with open(path, "rb") as f:
            data = f.read()
        n = len(data) // PAGE
        step = max(1, n // count)
        pages += [data[i * PAGE:(i + 1) * PAGE]
                  for i in range(0, n, step)][:count]
    return pages


DEFLATE_PAGES = deflate_corpus()
_DEFLATE_CODECS = {}


def deflate_codec(level):
    """One Codec per level, shared as the backend's is."""
    if level not in _DEFLATE_CODECS:
        _DEFLATE_CODECS[level] = _fastpath.Codec("deflate", level)
    return _DEFLATE_CODECS[level]


def zlib_page(data):
    """What the Python backend's decoder made of ``data``: the page, or
    None where it refused (a fresh decompressobj capped at a page and a
    byte; exactly a page out, the stream ended, nothing left over)."""
    stream = zlib.decompressobj(-12)
    try:
        out = stream.decompress(data, PAGE + 1)
    except zlib.error:
        return None
    if len(out) != PAGE or not stream.eof or stream.unused_data \
            or stream.unconsumed_tail:
        return None
    return out


def c_page(codec, data):
    """The C decoder's page, or None where it refused."""
    try:
        return codec.decompress(data)
    except ValueError:
        return None


@pytest.mark.parametrize("level", range(1, 10))
def test_deflate_output_is_pythons_zlib_at_every_level(level):
    codec = deflate_codec(level)
    backend = compress.create("deflate", level=level)
    assert len(DEFLATE_PAGES) >= 60
    for page in DEFLATE_PAGES:
        ours = codec.compress(page)
        assert ours == zlib.compress(page, level, -12)
        assert backend.compress(page) == ours
        assert codec.decompress(ours) == page
        assert backend.decompress(ours) == page
    # An incompressible page is one stored block, 5 bytes over the page:
    # the bound backend_deflate.c gives pages (and zram.c's scratch).
    assert len(codec.compress(random_page(5))) == PAGE + 5
    # Not pages (Codec.compress takes up to 16): still zlib's bytes.
    for data in (b"", b"x", random_page(6)[:PAGE - 1], random_page(7) * 2,
                 b"".join(DEFLATE_PAGES[-16:])):
        assert codec.compress(data) == zlib.compress(data, level, -12)


def runs_page(runs):
    """A page of repeated runs of bytes: compressible, in ways random
    bytes are not."""
    out = b"".join(chunk * n for chunk, n in runs)
    return (out * (PAGE // len(out) + 1))[:PAGE]


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(page=st.lists(st.tuples(st.binary(min_size=1, max_size=48),
                               st.integers(1, 40)),
                     min_size=1, max_size=40).map(runs_page)
       | st.binary(min_size=PAGE, max_size=PAGE),
       level=st.integers(1, 9))
def test_deflate_output_is_pythons_zlib_hypothesis(page, level):
    codec = deflate_codec(level)
    ours = codec.compress(page)
    assert ours == zlib.compress(page, level, -12)
    assert codec.decompress(ours) == page


def deflate_streams():
    """Streams near good ones: compressed pages cut at every byte, with
    bytes after them, with bytes flipped; streams of a page less or more;
    garbage."""
    pages = DEFLATE_PAGES
    good = [zlib.compress(p, 6, -12) for p in pages[:8]] + [
        zlib.compress(pages[20], 1, -12), zlib.compress(pages[40], 9, -12)]
    out = [b"", b"\0", b"\x03\0", b"\xff" * 10]
    rnd = random.Random(42)
    out += [rnd.randbytes(n) for n in (1, 2, 3, 7, 64, 1000, 4096, 5000)]
    for data in good:
        out += [data[:cut] for cut in range(len(data))]
        out += [data + b"\0", data + data, data + b"\x03\0"]
    for data in good[:3]:
        for i in range(len(data)):
            for mask in (0xff, 0x10, 0x01):
                bad = bytearray(data)
                bad[i] ^= mask
                out.append(bytes(bad))
    for n in (0, 1, 100, PAGE - 1, PAGE + 1, 2 * PAGE, 16 * PAGE):
        out.append(zlib.compress((b"".join(pages) * 17)[:n], 6, -12))
    return out


def test_deflate_decoder_refuses_what_zlib_refuses():
    """The C decoder and the Python backend's zlib decoder agree on every
    stream: both refuse it, or both make the same page of it."""
    codec = deflate_codec(6)
    refused = 0
    streams = deflate_streams()
    for data in streams:
        want = zlib_page(data)
        assert c_page(codec, data) == want, data[:32]
        refused += want is None
    # Not vacuous: most refused, some good (the flipped bytes that decode
    # to another page included).
    assert len(streams) // 2 < refused < len(streams)


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, len(DEFLATE_PAGES) - 1),
       level=st.integers(1, 9), cut=st.integers(0, 8),
       flips=st.lists(st.tuples(st.integers(0, 1 << 16),
                                st.integers(1, 255)), max_size=4),
       tail=st.binary(max_size=4))
def test_deflate_decoder_refuses_what_zlib_refuses_hypothesis(
        which, level, cut, flips, tail):
    data = bytearray(zlib.compress(DEFLATE_PAGES[which], level, -12))
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    data = bytes(data[:len(data) - cut]) + tail
    assert c_page(deflate_codec(level), data) == zlib_page(data)


def test_deflate_corrupt_messages_are_zlibs():
    """The backend refuses with the C decoder and words the error as it
    did before it had one: zlib's message, or what was wrong with the
    stream."""
    comp = compress.create("deflate")
    data = comp.compress(text_page(1))
    one_short = zlib.compress(text_page(1)[:-1], 6, -12)
    one_over = zlib.compress(text_page(1) + b"x", 6, -12)
    cases = [
        (data[:len(data) // 2], r"truncated stream \(\d+ bytes out\)"),
        (b"", r"truncated stream \(0 bytes out\)"),
        (data + b"\0", "1 bytes after the end of the stream"),
        (one_short, "4095 bytes out, expected 4096"),
        (one_over, "more than 4096 bytes out"),
        (b"\xff" * 10, "Error -3 while decompressing data: "),
    ]
    for slot, (bad, reason) in enumerate(cases):
        with pytest.raises(ValueError):
            comp.native.decompress(bad)
        with pytest.raises(CorruptDataError,
                           match="^deflate decompress: slot %d: %s"
                           % (slot, reason)) as info:
            comp.decompress(bad, slot=slot)
        assert info.value.errno == errno.EIO


def test_codec_construction_errors():
    with pytest.raises(ValueError, match="lz4 takes no dictionary"):
        _fastpath.Codec("lz4", 0, b"dict")
    for name in ("lzo", "lzo-rle"):
        with pytest.raises(ValueError, match="no native codec for " + name):
            _fastpath.Codec(name)
    with pytest.raises(ValueError, match="deflate takes no dictionary"):
        _fastpath.Codec("deflate", 6, b"dict")
    # zlib refuses a level past 9 when the first context is made.
    with pytest.raises(ValueError, match="^deflate compressor: zlib refused"
                       " a parameter$"):
        _fastpath.Codec("deflate", 10).compress(bytes(PAGE))
    with pytest.raises(ValueError, match="up to 65536"):
        _fastpath.Codec("lz4").compress(bytes(16 * PAGE + 1))


# --------------------------------------------------------------------------
# nbdkit's pread and pwrite as the device's C callables (plugin.py).

class RestCalls:
    """The fallbacks given to Device.nbd_callbacks: they record each call
    and finish the request as plugin.py's do."""

    def __init__(self, dev):
        self.dev, self.pins, self.calls = dev, 0, []

    def pin(self):
        self.pins += 1
        return False

    def pread_rest(self, h, buf, offset, flags, done):
        self.calls.append(("pread", offset, len(buf), flags, done))
        h.read_into(offset + done, memoryview(buf)[done:])

    def pwrite_rest(self, h, buf, offset, flags, done):
        self.calls.append(("pwrite", offset, len(buf), flags, done))
        h.write(offset + done, memoryview(buf)[done:])


def nbd_pair(dev):
    rest = RestCalls(dev)
    pread, pwrite = dev.nbd_callbacks(rest.pin, rest.pread_rest,
                                      rest.pwrite_rest)
    return rest, pread, pwrite


def test_nbd_callbacks_serve_whole_sectors_without_python():
    dev = Device(64 * PAGE)
    try:
        rest, pread, pwrite = nbd_pair(dev)
        data = b"".join(make_page(k, i) for i, k in enumerate(
            ["text", "random", "same", "zero", "half", "text"]))
        assert pwrite(dev, memoryview(data), 3 * PAGE, 0) is None
        out = bytearray(len(data))
        assert pread(dev, memoryview(out), 3 * PAGE, 0) is None
        assert bytes(out) == data == dev.read(3 * PAGE, len(data))
        assert rest.calls == [] and rest.pins == 2
        assert dev.num_writes == 6 and dev.num_reads == 12
    finally:
        dev.close()


@pytest.mark.parametrize("offset, length", [
    (100, PAGE), (PAGE, PAGE + 1), (0, 0), (63 * PAGE, 2 * PAGE),
    (64 * PAGE, PAGE), (1 << 62, PAGE)])
def test_nbd_callbacks_leave_partial_and_outside_requests_to_python(
        offset, length):
    dev = Device(64 * PAGE)
    try:
        rest, pread, pwrite = nbd_pair(dev)
        inside = offset + length <= dev.size
        data = make_bytes("text", 7, length)
        for call, buf, name in ((pwrite, memoryview(data), "pwrite"),
                                (pread, memoryview(bytearray(length)),
                                 "pread")):
            if inside:
                call(dev, buf, offset, 0)
            else:
                with pytest.raises(ZramdError, match="outside the disk"):
                    call(dev, buf, offset, 0)
            assert rest.calls[-1] == (name, offset, length, 0, 0)
        if inside:
            assert dev.read(offset, length) == data
    finally:
        dev.close()


def test_nbd_callbacks_hand_over_where_the_core_stops():
    # Over mem_limit part way: the write goes on in Python from the
    # sector the core stopped at, and fails there as Device.write does.
    dev = Device(64 * PAGE, mem_limit=8 * PAGE)
    try:
        rest, pread, pwrite = nbd_pair(dev)
        data = b"".join(random_page(i) for i in range(16))
        with pytest.raises(NoSpaceError):
            pwrite(dev, memoryview(data), 0, 0)
        (name, offset, length, flags, done), = rest.calls
        assert (name, offset, length) == ("pwrite", 0, 16 * PAGE)
        assert 0 < done < 16 * PAGE and done % PAGE == 0
        assert dev.read(0, done) == data[:done]
        assert dev.io_stat().failed_writes == 1
    finally:
        dev.close()
    # lzo has no C codec: its objects are read in Python, from the first
    # one on; the same-filled sectors before it were read in C.
    dev = Device(64 * PAGE, algorithm="lzo")
    try:
        rest, pread, pwrite = nbd_pair(dev)
        data = same_page(1) + bytes(PAGE) + text_page(2) + same_page(3)
        pwrite(dev, memoryview(data), 0, 0)
        assert rest.calls == [("pwrite", 0, 4 * PAGE, 0, 0)]
        out = bytearray(4 * PAGE)
        pread(dev, memoryview(out), 0, 0)
        assert bytes(out) == data
        assert rest.calls[-1] == ("pread", 0, 4 * PAGE, 0, 2 * PAGE)
        assert dev.num_reads == 4
    finally:
        dev.close()


def test_nbd_callbacks_refuse_misuse():
    dev = Device(8 * PAGE)
    try:
        with pytest.raises(TypeError, match="nbd_fallbacks"):
            dev._zram.nbd_pread(dev, bytearray(PAGE), 0, 0)
        rest, pread, pwrite = nbd_pair(dev)
        with pytest.raises(TypeError, match="takes"):
            pread(dev, bytearray(PAGE), 0)
        with pytest.raises(TypeError, match="three callables"):
            dev.nbd_callbacks(None, rest.pread_rest, rest.pwrite_rest)
        # A read-only buffer cannot take a read: Python's path says so.
        with pytest.raises(TypeError):
            pread(dev, memoryview(bytes(PAGE)), 0, 0)
        assert rest.calls[-1] == ("pread", 0, PAGE, 0, 0)
    finally:
        dev.close()
    dev = Device(PAGE, native=False)
    try:
        assert dev.nbd_callbacks(None, None, None) is None
    finally:
        dev.close()


def backed_devices(tmp_path, size=16 * PAGE, algorithm="lz4"):
    """A native and a Python-path device, each over a backing file of its
    own (32 blocks)."""
    devs = []
    for native in (True, False):
        path = tmp_path / ("backing-%d.img" % native)
        with open(path, "wb") as f:
            f.truncate(32 * PAGE)
        path.chmod(0o600)
        devs.append(Device(size, algorithm=algorithm, native=native,
                           backing_dev=str(path)))
    return devs


def test_written_back_and_partial_sectors_stay_in_c(tmp_path):
    """WB sectors (whole or in part) and partial sectors of every kind
    are read and patched in C, counted as the Python paths count them;
    only a patch of a WB slot (whose block Python frees) goes there."""
    c, py = devs = backed_devices(tmp_path)
    try:
        data = [text_page(i) for i in range(3)] + [random_page(3)] + [
            make_page("same", 4), bytes(PAGE)] + [text_page(6)] + [
            random_page(7)]
        for dev in devs:
            dev.write(0, b"".join(data))
            dev.mark_idle()
            assert dev.writeback("idle", pages=[1, 3, 6]) == 3
        calls = python_path_calls(c)
        model = bytearray(b"".join(data) + bytes(8 * PAGE))
        rng = random.Random(5)
        for dev in devs:
            # every kind of sector, in part: WB, huge, compressed, same,
            # zero-filled, and holes
            for index in range(10):
                assert dev.read(index * PAGE + 100, 1000) \
                    == bytes(model[index * PAGE + 100:index * PAGE + 1100])
            assert read_guarded(dev, 1000, 6 * PAGE) == bytes(
                model[1000:1000 + 6 * PAGE])
        for step in range(40):
            index = rng.choice([0, 2, 4, 5, 7, 8, 9])   # not WB
            lo = rng.randrange(PAGE)
            n = rng.randrange(1, PAGE - lo + 1)
            patch = rng.choice([random.Random(step).randbytes(n), bytes(n),
                                b"\x07" * n])
            for dev in devs:
                dev.write(index * PAGE + lo, patch)
            model[index * PAGE + lo:index * PAGE + lo + n] = patch
            if step % 5 == 0:
                for dev in devs:
                    dev.write_zeroes(index * PAGE + 10, PAGE - 20)
                model[index * PAGE + 10:index * PAGE + PAGE - 10] = bytes(
                    PAGE - 20)
            check_stats_equal(c, py)
        for dev in devs:
            assert dev.read(0, 16 * PAGE) == bytes(model)
        assert calls == {"read": [], "write": []}
        # A patch of a WB slot: Python's, which frees the block.
        for dev in devs:
            dev.write(PAGE + 5, b"xyz")
            dev.discard(6 * PAGE + 1, 10)
            assert dev.bd_stat().bd_count == 1
        model[PAGE + 5:PAGE + 8] = b"xyz"
        model[6 * PAGE + 1:6 * PAGE + 11] = bytes(10)
        assert calls == {"read": [1, 6], "write": [1, 6]}
        for dev in devs:
            assert dev.read(0, 16 * PAGE) == bytes(model)
        check_stats_equal(c, py)
        assert_sound(c, py)
    finally:
        close_all(*devs)


def check_stats_equal(c, py):
    for stat in ("mm_stat", "io_stat", "bd_stat"):
        assert getattr(c, stat)() == getattr(py, stat)(), stat
    assert (c.num_reads, c.num_writes) == (py.num_reads, py.num_writes)


@pytest.mark.parametrize("how", ["truncate", "close"])
def test_backing_read_error_raises_as_before(tmp_path, how):
    """A block the backing file does not give back: C hands the sector to
    Python, which raises its CorruptDataError; nothing is counted read."""
    c, py = devs = backed_devices(tmp_path)
    try:
        for dev in devs:
            dev.write(0, text_page(1) + text_page(2))
            dev.mark_idle()
            assert dev.writeback("idle", pages=[1]) == 1
            blk = dev.slot_get(1)[1]
            if how == "truncate":
                os.truncate(dev.backing_dev, blk * PAGE + 100)
                why = "short read"
            else:
                # the descriptor's number then names no open file
                os.close(dev._backing.fileno())
                dev._backing.close = lambda: None
                why = "Bad file descriptor"
            for offset, length in ((PAGE, PAGE), (0, 2 * PAGE),
                                   (PAGE + 10, 100)):
                with pytest.raises(CorruptDataError,
                                   match="backing_dev read: slot 1: block"
                                         " %d: %s" % (blk, why)):
                    dev.read(offset, length)
            assert dev.io_stat().failed_reads == 3
            assert dev.bd_stat().bd_reads == 0
        assert c.num_reads == py.num_reads
    finally:
        close_all(*devs)


def linearizations(page, ops):
    """The pages ``ops`` (lo, data) applied to ``page`` in every order
    give."""
    out = set()

    def go(page, left):
        if not left:
            out.add(bytes(page))
        for k, (lo, data) in enumerate(left):
            p = bytearray(page)
            p[lo:lo + len(data)] = data
            go(p, left[:k] + left[k + 1:])

    go(bytearray(page), list(ops))
    return out


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_partial_writes_racing_whole_writes_lose_nothing(algorithm):
    """Two C read-modify-writes of a sector's bytes and a whole-sector
    write of it, started together, many times: the sector ends as the
    three in some order would leave it (a patch stored over a page that
    changed since its read would lose the other patch or undo the whole
    write), and the device's stats add up."""
    dev = Device(4 * PAGE, algorithm=algorithm)
    try:
        calls = python_path_calls(dev)
        page = text_page(0)
        dev.write(PAGE, page)
        rng = random.Random(3)
        for rnd in range(300):
            ops = [(rng.randrange(0, 1500), rng.randbytes(500)),
                   (rng.randrange(2000, 3500), make_page("text", rnd)[:500]),
                   (0, rng.choice([text_page(rnd), random_page(rnd),
                                   make_page("same", rnd)]))]
            barrier = threading.Barrier(len(ops))

            def run(lo, data):
                barrier.wait()
                dev.write(PAGE + lo, data)

            threads = [threading.Thread(target=run, args=op) for op in ops]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            got = dev.read(PAGE, PAGE)
            assert got in linearizations(page, ops), rnd
            page = got
        assert calls == {"read": [], "write": []}
        assert dev.num_writes == 1 + 3 * 300
        assert dev.num_reads >= 2 * 300 + 300
        assert_sound(dev)
    finally:
        dev.close()
