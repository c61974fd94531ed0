"""The post-processing policy: zram's manual triggers, run on a schedule.

Kernel zram leaves idle marking, recompression and writeback to whoever
writes to sysfs; zram-generator's users ask for a scheduler (its issues
#164 and #178).  This is one: every ``interval`` seconds a worker thread

1. marks slots idle that were not accessed for ``idle_age`` seconds
   (``echo AGE > idle``), then
2. recompresses pages of ``recompress_type`` with the secondary algorithms
   (``echo type=idle max_pages=N > recompress``), if any are set, then
3. writes pages of ``writeback_type`` back to the backing device
   (``echo idle > writeback``), if there is one.

Each pass is bounded by ``max_pages`` per step so it never holds the
device busy for long.  What it did is counted in a PolicyStat (the
``policy_stat`` control attribute); a failed step is counted in ``errors``,
logged (logger ``zramd.policy``: under nbdkit, on its stderr), and the
other steps and the next pass still run.  Whatever a step raises, a
ZramdError or a bug, the worker thread stays alive: a policy that died
silently would leave the device growing with nothing to show why.
"""

import logging
import threading
import time

from .device import PP_TYPES, RECOMPRESS_TYPES
from .errors import ConfigError, ZramdError
from .stats import PolicyStat

log = logging.getLogger(__name__)


class Policy:
    """A schedule of post-processing passes over ``device``."""

    def __init__(self, device, interval, idle_age=3600,
                 recompress_type=None, writeback_type=None, max_pages=0):
        for key, value in (("policy_interval", interval),
                           ("policy_idle_age", idle_age),
                           ("policy_max_pages", max_pages)):
            if not isinstance(value, int) or value < 0:
                raise ConfigError("%s: %r; accepted: an integer >= 0"
                                  % (key, value))
        for key, value, accepted in (
                ("policy_recompress", recompress_type, RECOMPRESS_TYPES),
                ("policy_writeback", writeback_type, tuple(PP_TYPES))):
            if value is not None and value not in accepted:
                raise ConfigError("%s: %r; accepted: %s" % (
                    key, value, " ".join(accepted)))
        self.device = device
        self.interval = interval
        self.idle_age = idle_age
        self.recompress_type = recompress_type
        self.writeback_type = writeback_type
        self.max_pages = max_pages
        self._lock = threading.Lock()
        self._counts = dict(runs=0, idle_marked=0, recompressed=0,
                            written_back=0, errors=0)
        self._stop = threading.Event()
        self._thread = None

    def run_once(self):
        """One pass: idle marking, recompression, writeback.  A step that
        raises (any Exception) is counted in ``errors`` and logged; the
        other steps still run."""
        dev = self.device
        failed = []
        marked = self._step(failed, "idle", dev.mark_idle, self.idle_age)
        recompressed = written = 0
        if self.recompress_type and dev.recomp_algorithm():
            recompressed = self._step(failed, "recompress", dev.recompress,
                                      self.recompress_type,
                                      max_pages=self.max_pages)
        if self.writeback_type and dev.backing_dev:
            written = self._step(failed, "writeback", dev.writeback,
                                 self.writeback_type,
                                 max_pages=self.max_pages)
        self._add(idle_marked=marked, recompressed=recompressed,
                  written_back=written, errors=len(failed))

    @staticmethod
    def _step(failed, name, action, *args, **kwargs):
        """``action(*args, **kwargs)``, the count it returns, or 0 when it
        raised: then the error is logged and ``name`` appended to
        ``failed``.  A ZramdError is a refusal or an I/O error, its message
        says which; anything else is a bug, logged with its traceback."""
        try:
            return action(*args, **kwargs)
        except ZramdError as err:
            log.warning("policy: %s: %s", name, err)
        except Exception:
            log.exception("policy: %s: unexpected error", name)
        failed.append(name)
        return 0

    def _add(self, runs=1, **counts):
        with self._lock:
            self._counts["runs"] += runs
            for key, n in counts.items():
                self._counts[key] += n

    def stat(self):
        with self._lock:
            return PolicyStat(**self._counts)

    def start(self):
        """Start the worker (after nbdkit forks); no-op when interval is 0."""
        if self.interval and self._thread is None:
            self._thread = threading.Thread(target=self._loop,
                                            name="zramd-policy", daemon=True)
            self._thread.start()

    def _loop(self):
        while not self._stop.wait(self.interval):
            started = time.monotonic()
            try:
                self.run_once()
            except Exception:
                # Outside the steps (a device gone from under us): still
                # counted, and the next interval tries again.
                log.exception("policy: pass failed")
                self._add(runs=0, errors=1)
            # A pass longer than the interval does not pile up passes.
            if time.monotonic() - started > self.interval:
                self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
