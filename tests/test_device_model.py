"""zramd.device.Device against the model of the device (device_model.py).

A hypothesis state machine makes every call on a real Device and on the
model and requires the same result (or the same exception) and, after
every step, the same mm_stat, io_stat, bd_stat, num_reads, num_writes,
extents and contents.  The pool is modelled by tests/zsmalloc_model.py,
so memory is compared exactly too: for that the device's deferred frees
are made immediate, as the kernel's discard frees (the deferred queue is
the pool's, tested in test_zsmalloc.py), which makes the order of the
pool's calls the device's alone.  A ``native=False`` device (every sector through the
Python paths that otherwise take what the C requests hand back) is held
to the same model.
"""

import random

import pytest
from hypothesis import HealthCheck, event, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize,
                                 invariant, rule)

from device_model import PAGE, DeviceModel
from test_device import DEV_SIZE, make_data, ranges
from zramd.device import Device
from zramd.errors import NoSpaceError, ZramdError

BAD_RANGES = st.sampled_from([(-1, 1), (DEV_SIZE, 1), (DEV_SIZE - 1, 2),
                              (0, DEV_SIZE + 1), (-PAGE, PAGE)])


def outcome(call, *args):
    """The result of ``call(*args)``, or the class of ZramdError it
    raised."""
    try:
        return call(*args)
    except ZramdError as err:
        return type(err)


def immediate_frees(dev):
    """Make ``dev``'s deferred frees immediate (see the module docstring)."""
    dev.pool.set_deferred_capacity(0)


class DeviceVsModel(RuleBasedStateMachine):

    def __init__(self):
        super().__init__()
        self.dev = self.model = None

    @initialize(algorithm=st.sampled_from(["lz4", "lz4", "zstd", "lz4hc",
                                           "deflate"]),
                chain=st.sampled_from([8, 8, 4, 16]),
                native=st.sampled_from([True, True, False]))
    def start(self, algorithm, chain, native):
        self.dev = Device(DEV_SIZE, algorithm=algorithm, chain_size=chain,
                          native=native)
        immediate_frees(self.dev)
        self.model = DeviceModel(DEV_SIZE, algorithm=algorithm,
                                 chain_size=chain)

    def teardown(self):
        for x in (self.dev, self.model):
            if x is not None:
                x.close()

    def both(self, name, *args):
        got = outcome(getattr(self.dev, name), *args)
        want = outcome(getattr(self.model, name), *args)
        assert got == want, (name, args)
        return got

    @rule(r=ranges(), kind=st.sampled_from(
        ["random", "zero", "same", "text", "near_huge"]),
        seed=st.integers(0, 1 << 16))
    def write(self, r, kind, seed):
        offset, length = r
        got = self.both("write", offset,
                        make_data(kind, seed, offset, length))
        event("write refused" if got is NoSpaceError else "write stored")

    @rule(r=ranges(max_len=DEV_SIZE))
    def read(self, r):
        self.both("read", *r)

    @rule(r=ranges())
    def read_into(self, r):
        offset, length = r
        buf = bytearray(b"\xee" * length)
        self.dev.read_into(offset, buf)
        assert buf == self.model.read(offset, length)

    @rule(r=ranges())
    def discard(self, r):
        self.both("discard", *r)

    @rule(r=ranges())
    def write_zeroes(self, r):
        self.both("write_zeroes", *r)

    @rule(r=ranges(max_len=DEV_SIZE), max_runs=st.none() | st.integers(0, 4))
    def extents(self, r, max_runs):
        self.both("extents", *r, max_runs)

    @rule(op=st.sampled_from(["read", "write", "discard", "write_zeroes",
                              "extents"]), r=BAD_RANGES)
    def out_of_range(self, op, r):
        offset, length = r
        if op == "write":
            self.both(op, offset, bytes(max(length, 0)))
        else:
            self.both(op, offset, length)

    @rule(op=st.sampled_from(["read", "discard", "write_zeroes", "extents"]),
          offset=st.integers(0, DEV_SIZE))
    def empty(self, op, offset):
        self.both(op, offset, 0)

    @rule()
    def compact(self):
        self.both("compact")

    @rule()
    def mark_idle(self):
        self.both("mark_idle")

    @rule(delta=st.sampled_from([None, -1, 0, 1, 2, 8]),
          extra=st.integers(0, PAGE - 1))
    def set_mem_limit(self, delta, extra):
        """0 (no limit), or about what the pool holds now: the next writes
        that need memory are refused or not depending on the exact
        accounting."""
        if delta is None:
            limit = 0
        else:
            pages = self.model.pool.total_pages() + delta
            limit = max(0, pages * PAGE - extra) if pages > 0 else 0
        self.both("set_mem_limit", limit)

    @rule()
    def reset_mem_used_max(self):
        self.both("reset_mem_used_max")

    @invariant()
    def same_state(self):
        if self.dev is None:
            return
        for name in ("mm_stat", "io_stat", "bd_stat", "debug_stat"):
            if name == "debug_stat":
                assert str(self.dev.debug_stat()) == "version: 1\n0        0\n"
                continue
            assert self.both(name) is not None
        assert self.dev.mem_limit == self.model.mem_limit
        assert (self.dev.num_reads, self.dev.num_writes) == (
            self.model.num_reads, self.model.num_writes)
        self.both("extents", 0, DEV_SIZE)
        self.both("read", 0, DEV_SIZE)


DeviceVsModel.TestCase.settings = settings(
    max_examples=120, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestDeviceVsModel = DeviceVsModel.TestCase


def test_model_refuses_what_the_device_refuses():
    """The model's mem_limit rule on its own: a write needing memory over
    the limit keeps the old contents and counts a failed write."""
    m = DeviceModel(4 * PAGE)
    m.write(0, random.Random(0).randbytes(PAGE))      # huge: one frame
    m.set_mem_limit(PAGE)
    with pytest.raises(NoSpaceError):
        m.write(PAGE, random.Random(1).randbytes(PAGE))
    m.write(2 * PAGE, bytes(PAGE))          # same-filled: no memory
    assert m.io_stat().failed_writes == 1
    assert m.mm_stat().same_pages == 1
    assert m.read(PAGE, PAGE) == bytes(PAGE)
    m.close()
