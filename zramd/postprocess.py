"""Post-processing: recompression, writeback and dictionary training, on
the device's slot primitives.

As zram's recompress_store and writeback_store (drivers/block/zram/
zram_drv.c): a pass chooses candidate slots by their flags from a
snapshot of the slot table (``Device.slot_get``, no lock), then *takes*
each under its slot lock (``Device.slot_take``: the slot holds a pool
object with the flags asked for; it is marked PP_SLOT and its page copied
out); the expensive part (compression, backing-device I/O) runs
unlocked; the new contents replace the old only if the slot is still the
pass's (``Device.slot_put``), and otherwise the pass lets it go
(``Device.slot_release``).  A write, discard or free clears the whole slot
word, PP_SLOT with it, and one pass runs at a time (the device's pass
lock), so a slot whose PP_SLOT is still set holds what the pass took; a
read or mark_idle meanwhile changes only IDLE.  Whatever the outcome, the
pass clears PP_SLOT of a slot it still owns, or the slot would never be
post-processed again.

The configuration these passes read stays the device's: the secondary
algorithms (``Device.secondary``, set_recomp_algorithm), the backing
device and its writeback_limit (``Device.writeback_budget_left``,
``charge_writeback``), and the primary's dictionaries
(``Device.add_dictionary``).  The device's methods of the same names take
the locks and call these.
"""

import random

from ._fastpath import (
    COMP_PRIORITY_MASK, COMP_PRIORITY_SHIFT, HUGE, IDLE, INCOMPRESSIBLE,
    MAX_PRIORITIES, PAGE_SIZE, SAME, SIZE_MASK, WB)
from .errors import InvalidRequestError, ZramdError

# Selections, as zram's recompress and writeback "type=".
PP_TYPES = {"idle": IDLE, "huge": HUGE, "huge_idle": HUGE | IDLE,
            "incompressible": INCOMPRESSIBLE}
# recompress takes these (an INCOMPRESSIBLE page is never recompressed).
RECOMPRESS_TYPES = ("idle", "huge", "huge_idle")


def candidates(dev, pp_type, pages, accepted=tuple(PP_TYPES)):
    """Slot indices for a post-processing pass: ``pages`` (an iterable
    of indices) or the whole disk; ``pp_type`` must be one of
    ``accepted`` or None (every slot)."""
    if pp_type is not None and pp_type not in accepted:
        raise InvalidRequestError("type: %r; accepted: %s" % (
            pp_type, " ".join(accepted)))
    if pages is None:
        return range(dev.nr_pages)
    for index in pages:
        if not 0 <= index < dev.nr_pages:
            raise InvalidRequestError(
                "page_index: %r; accepted: 0..%d" % (index,
                                                     dev.nr_pages - 1))
    return pages


def recompress(dev, pp_type=None, threshold=0, max_pages=0,
               algorithm=None, priority=None, pages=None):
    """Re-compress stored pages with the secondary algorithms, as
    zram's recompress: keep a result only if it lands in a smaller
    pool size class (and under ``threshold`` when given), remember the
    priority in the slot, flag INCOMPRESSIBLE when even the last
    algorithm failed.  Returns the number of pages recompressed.  The
    caller holds the device's pass lock."""
    active = [p for p in range(1, MAX_PRIORITIES)
              if dev.secondary(p) is not None]
    if not active:
        raise InvalidRequestError("recompress: no recomp_algorithm set")
    if algorithm is not None or priority is not None:
        chosen = [p for p in active
                  if (algorithm is None or dev.secondary(p).name
                      == algorithm)
                  and (priority is None or p == priority)]
        if not chosen:
            raise InvalidRequestError(
                "recompress: algo=%s priority=%s; accepted: %s" % (
                    algorithm, priority, " ".join(
                        "algo=%s priority=%d"
                        % (dev.secondary(p).name, p) for p in active)))
        prio_min, prio_max = chosen[0], chosen[0] + 1
    else:
        prio_min, prio_max = 1, active[-1] + 1
    if not isinstance(threshold, int) or not 0 <= threshold <= PAGE_SIZE:
        raise InvalidRequestError("threshold: %r; accepted: 0..%d"
                                  % (threshold, PAGE_SIZE))
    indices = candidates(dev, pp_type, pages, RECOMPRESS_TYPES)
    need = PP_TYPES[pp_type] if pp_type else 0
    last = prio_max > active[-1]
    done = 0
    budget = max_pages
    for index in indices:
        if max_pages and budget <= 0:
            break
        meta = dev.slot_get(index)[0]
        prio = (meta & COMP_PRIORITY_MASK) >> COMP_PRIORITY_SHIFT
        if (prio + 1 >= prio_max or meta & need != need
                or meta & (SAME | WB | INCOMPRESSIBLE)):
            continue
        taken = dev.slot_take(index, need, INCOMPRESSIBLE)
        if taken is None:
            continue
        old_size = taken[0] & SIZE_MASK
        if threshold and old_size < threshold:
            dev.slot_put(index, taken)
            continue
        budget -= 1
        prio = (taken[0] & COMP_PRIORITY_MASK) >> COMP_PRIORITY_SHIFT
        try:
            done += _recompress_taken(
                dev, index, taken, range(max(prio_min, prio + 1), prio_max),
                threshold, last)
        except BaseException:
            dev.slot_release(index, taken)
            raise
    return done


def _recompress_taken(dev, index, taken, priorities, threshold, last):
    """Recompress the page of slot ``index``, taken as ``taken``, with
    the first of ``priorities`` that shrinks it enough, and put the
    result in the slot; ``last``: those include the last algorithm.
    Returns 1 if the slot now holds a recompressed object, else 0."""
    old_class = dev.pool.lookup_class_index(taken[0] & SIZE_MASK)
    result = None
    for p in priorities:
        comp = dev.secondary(p)
        if comp is None:
            continue
        data = comp.compress(taken[2])
        n = len(data)
        if (n >= dev.pool.huge_class_size
                or dev.pool.lookup_class_index(n) >= old_class
                or (threshold and n >= threshold)):
            continue
        result = p, data
        break
    # As zram, a page looked at is no longer idle, whatever the
    # outcome, so another pass does not pick it again.
    if result is None:
        dev.slot_release(index, taken, INCOMPRESSIBLE if last else 0, IDLE)
        return 0
    p, data = result
    handle = dev.malloc_written(data)
    if dev.slot_put(index, taken, p << COMP_PRIORITY_SHIFT, handle,
                    len(data), comp):
        return 1
    dev.pool.free(handle)
    return 0


def writeback(dev, backing, pp_type="idle", pages=None, max_pages=0):
    """Move selected pages to ``backing`` (flag WB, pool memory freed), as
    zram's writeback; ``pages`` limits it to those slot indices,
    ``max_pages`` (0: no bound) to that many pages.  Returns the number
    of pages written back.  As zram, a page whose write fails stays in
    memory and the pass goes on to the others, then raises the last
    error; no free block on the device ends it.  The caller holds the
    device's backing-device and pass locks."""
    if backing is None:
        raise InvalidRequestError("writeback: no backing_dev set")
    indices = candidates(dev, pp_type, pages)
    need = PP_TYPES[pp_type] if pp_type else 0
    done = 0
    failed = None           # the last write error: the pass goes on
    for index in indices:
        if max_pages and done >= max_pages:
            break
        meta, handle = dev.slot_get(index)
        if not handle or meta & need != need \
                or meta & (SAME | WB):
            continue
        if not dev.writeback_budget_left():
            break
        taken = dev.slot_take(index, need, 0)
        if taken is None:
            continue
        try:
            blk = backing.alloc_block()     # none left: the pass ends
        except BaseException:
            dev.slot_release(index, taken)
            raise
        try:
            backing.write_page(blk, taken[2])
        except BaseException as err:
            # As zram, a block whose write failed goes back, and the
            # page stays in memory.  An I/O error is not fatal: the
            # pass tries the other pages and reports the last error.
            backing.free_block(blk)
            dev.slot_release(index, taken)
            if not isinstance(err, ZramdError):
                raise
            failed = err
            continue
        if dev.slot_put(index, taken, WB, blk):
            # Charged only now, as zram does once it finds the slot
            # still its own: a page rewritten meanwhile was not
            # written back.
            dev.charge_writeback()
            done += 1
        else:
            backing.free_block(blk)
    if failed is not None:
        raise failed
    return done


def train_dictionary(dev, dict_size=16384, max_samples=4096):
    """Train a zstd dictionary on up to ``max_samples`` stored pages and
    make it the primary compressor's from now on, without stopping I/O
    (Device.add_dictionary).  Stored pages keep the dictionary they were
    compressed with; dictionaries no page uses any more are retired.
    Returns the new dictionary's id."""
    if dev.algorithm != "zstd":
        raise InvalidRequestError("train_dictionary: algorithm %s;"
                                  " accepted: zstd" % dev.algorithm)
    import zstandard
    # Samples spread over the whole disk, not its first pages: what the
    # dictionary learns should be what the device holds.
    stored = [i for i, (meta, handle) in enumerate(
                  map(dev.slot_get, range(dev.nr_pages)))
              if handle and not meta & (SAME | WB | HUGE)]
    if len(stored) > max_samples:
        stored = sorted(random.Random(len(stored)).sample(stored,
                                                          max_samples))
    samples = []
    for index in stored:
        try:
            samples.append(dev.slot_read(index))
        except ZramdError:
            continue
    if len(samples) < 16:
        raise InvalidRequestError("train_dictionary: %d stored pages;"
                                  " accepted: at least 16" % len(samples))
    try:
        trained = zstandard.train_dictionary(dict_size, samples)
    except zstandard.ZstdError as e:
        raise InvalidRequestError("train_dictionary: %s" % e) from None
    return dev.add_dictionary(trained.as_bytes())
