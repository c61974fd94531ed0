"""The VM rig's short form: a Debian 13 guest with Debian's kernel,
systemd as PID 1 on cgroup v2 and kernel nbd (vm/rig, docs/testing.md)
runs the README's quick start, then ``zramd up`` as swap through
nbd-client from zramd.conf with a checked workload larger than its
cgroup's memory.high, and ``zramd down``.

It boots a VM for several minutes, so it runs only when asked:
``ZRAMD_VM=1``.  The guest image is built first if the cache
(``$ZRAMD_VM_CACHE``, default /var/cache/zramd/vm) has no current one
(about 2.5 minutes and 700 MB from Debian's archive).  Without ZRAMD_VM=1
the test skips and says how to run it.  A cached image alone is not a
request: on a machine shared by several work trees it would make every
suite run boot a guest.

It skips, saying why, without /dev/kvm or root, or when the image cannot
be built; asked for, it fails without qemu-system-x86 or mmdebstrap
(./scripts/test installs them with ZRAMD_VM=1).  The accelerator is the
rig's choice (KVM when a probe guest really runs under it, else TCG); the
summary records it.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
RIG = os.path.join(REPO, "vm", "rig")
#: Debian 13: it boots and runs the short form faster here than Debian 12
#: (83 s to the plan and 5.6 minutes in all, against 121 s and 10 under
#: TCG; docs/testing.md, Costs); `vm/rig run --plan full --suite all`
#: covers both.
SUITE = "trixie"
#: vm/rig's own deadline for the short form is 1200 s under TCG (one
#: boot); this leaves room for an image build (about 150 s), the probe
#: (45 s) and a wait for another rig's guest, and for nothing else to hang.
TIMEOUT = 1800


def _load_rig():
    """vm/rig as a module (it has no .py suffix)."""
    from importlib.machinery import SourceFileLoader
    from importlib.util import module_from_spec, spec_from_loader
    loader = SourceFileLoader("zramd_vm_rig", RIG)
    module = module_from_spec(spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def why_not():
    """Why the short form does not run here, or None."""
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm"
    if os.geteuid() != 0:
        return "needs root (the rig boots a guest with 9p shares as root)"
    if os.environ.get("ZRAMD_VM", "") != "1":
        return "set ZRAMD_VM=1 to boot the guest (docs/testing.md)"
    return None


def missing_host_packages():
    """What the rig needs on the host and lacks.  Asked for (ZRAMD_VM=1)
    on a machine that can boot a guest, this fails the test instead of
    skipping it: scripts/test installs them, and a skip would hide a new
    machine that never runs the rig."""
    missing = []
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86")
    rig = _load_rig()
    cache = os.environ.get("ZRAMD_VM_CACHE", rig.DEFAULT_CACHE)
    if not rig.image_ready(cache, SUITE) and shutil.which("mmdebstrap") is None:
        missing.append("mmdebstrap")
    return missing


@pytest.mark.timeout(TIMEOUT)
def test_short_form_swap_through_kernel_nbd(tmp_path):
    reason = why_not()
    if reason:
        pytest.skip("VM rig: " + reason)
    missing = missing_host_packages()
    assert not missing, ("ZRAMD_VM=1 but %s not installed (./scripts/test "
                         "installs RIG_PACKAGES)" % ", ".join(missing))
    out = tmp_path / "vm"
    proc = subprocess.run([sys.executable, RIG, "run", "--plan", "short",
                           "--suite", SUITE, "--out", str(out)],
                          stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=TIMEOUT - 60)
    if proc.returncode == 77:
        pytest.skip("VM rig: " + proc.stderr.strip().splitlines()[-1])
    summary_path = out / "summary.json"
    if not summary_path.exists():
        if "vm/build-image" in proc.stderr:
            pytest.skip("VM rig: the guest image cannot be built here: %s"
                        % proc.stderr.strip().splitlines()[-1])
        pytest.fail("vm/rig exited %d without a summary:\n%s"
                    % (proc.returncode, proc.stderr[-3000:]))
    summary = json.loads(summary_path.read_text())
    if summary.get("error") and not summary["suites"]:
        pytest.skip("VM rig: %s" % summary["error"])
    problems = []
    for suite in summary["suites"]:
        for phase in suite["phases"]:
            if phase.get("error"):
                problems.append("%s/%s: %s" % (suite["suite"], phase["phase"],
                                               phase["error"]))
            for step in phase["steps"]:
                if step["status"] == "fail":
                    problems.append("%s/%s: %s: %s" % (
                        suite["suite"], phase["phase"], step["step"],
                        step.get("detail")))
    steps = {s["step"]: s for su in summary["suites"] for ph in su["phases"]
             for s in ph["steps"]}
    assert not problems, "\n".join(problems + ["(logs: %s)" % out])
    assert steps.get("swap_nbd", {}).get("status") == "pass", steps.keys()
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_guest_that_dies_before_its_plan_says_why(tmp_path):
    """The rig boots a phase again only when its guest died before the
    plan began, and says why from the serial log."""
    rig = _load_rig()
    panicked = tmp_path / "panicked.log"
    panicked.write_text(
        "[    2.695918] sched_clock: Marking stable\n"
        "[    2.699119] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n"
        "[    2.702151] Oops: int3: 0000 [#2] PREEMPT SMP NOPTI\n"
        "[    2.702482] Kernel panic - not syncing: Fatal exception\n")
    assert rig.boot_failure(str(panicked)) == (
        "Oops: int3: 0000 [#1] PREEMPT SMP NOPTI; "
        "Kernel panic - not syncing: Fatal exception")
    silent = tmp_path / "silent.log"
    silent.write_text("[    1.000000] Linux version 6.12\n")
    assert rig.boot_failure(str(silent)) == \
        "no ZRAMD-VM-START on the serial console"
    assert rig.boot_failure(str(tmp_path / "absent.log")) == \
        "no ZRAMD-VM-START on the serial console"
    started = tmp_path / "started.log"
    started.write_text("[   20.5] zramd-vm[1]: ZRAMD-VM-START bench\n"
                       "[   90.0] Kernel panic - not syncing: later\n")
    assert rig.boot_failure(str(started)) is None
