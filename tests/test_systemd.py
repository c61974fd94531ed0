"""The systemd units and zramd-generator: systemd-analyze verify of every
unit, the generator's output for swap and file-system devices, and the
ordering that makes shutdown swap off before the server stops."""

import configparser
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = os.path.join(REPO, "systemd")
GENERATOR = os.path.join(UNITS, "zramd-generator")
TEMPLATES = sorted(f for f in os.listdir(UNITS) if f.endswith(".service"))

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (apt-get install systemd)")


def verify(unit_path, *units):
    env = dict(os.environ, SYSTEMD_UNIT_PATH=":".join(unit_path) + ":",
               SYSTEMD_LOG_LEVEL="notice")
    # Without man (a minimal root), verify would fail on Documentation=.
    man = [] if shutil.which("man") else ["--man=no"]
    return subprocess.run(["systemd-analyze", "verify", *man, *units],
                          env=env, capture_output=True, text=True,
                          timeout=60)


def load(path):
    """A unit file as {section: {key: [values]}}."""
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",),
                                          dict_type=_MultiDict)
    parser.optionxform = str
    parser.read(path)
    return {s: {k: v.split("\n") for k, v in parser[s].items()}
            for s in parser.sections()}


class _MultiDict(dict):
    def __setitem__(self, key, value):
        if isinstance(value, list) and key in self:
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def test_there_are_units():
    assert TEMPLATES == ["zramd-attach@.service", "zramd@.service"]
    assert os.access(GENERATOR, os.X_OK)


@pytest.mark.parametrize("template", TEMPLATES)
def test_verify_every_unit(template):
    instance = template.replace("@.", "@zramd0.")
    r = verify([UNITS], os.path.join(UNITS, template), instance)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr     # not even a warning


def test_verify_can_fail(tmp_path):
    # The check above means something: a broken copy is refused.
    broken = open(os.path.join(UNITS, "zramd@.service")).read().replace(
        "ExecStart=/usr/bin/python3", "ExecStart=/nonexistent/python3")
    (tmp_path / "zramd@.service").write_text(broken + "Bogus=1\n")
    shutil.copy(os.path.join(UNITS, "zramd-attach@.service"), tmp_path)
    r = verify([str(tmp_path)], "zramd@zramd0.service")
    assert r.returncode != 0
    assert "is not executable" in r.stderr
    assert "Unknown key 'Bogus'" in r.stderr


def test_server_unit_contract():
    u = load(os.path.join(UNITS, "zramd@.service"))
    svc = u["Service"]
    assert svc["Type"] == ["exec"]
    assert svc["ExecStart"] == ["/usr/bin/python3 -m zramd.attach serve %i"]
    assert svc["Restart"] == ["on-failure"]
    assert svc["RuntimeDirectoryPreserve"] == ["yes"]
    assert any(d.startswith("man:nbdkit") for d in
               " ".join(u["Unit"]["Documentation"]).split())
    assert u["Unit"]["Conflicts"] == ["shutdown.target"]


def test_attach_unit_is_ordered_after_the_server():
    u = load(os.path.join(UNITS, "zramd-attach@.service"))
    # Started after the server and stopped before it (systemd stops in the
    # reverse order), and stopped with it.
    assert "zramd@%i.service" in u["Unit"]["After"]
    assert "zramd@%i.service" in u["Unit"]["BindsTo"]
    svc = u["Service"]
    assert svc["Type"] == ["oneshot"] and svc["RemainAfterExit"] == ["yes"]
    assert svc["ExecStart"] == [
        "/usr/bin/python3 -m zramd.attach up --no-server %i"]
    assert svc["ExecStop"] == ["/usr/bin/python3 -m zramd.attach down %i"]


def test_serve_builds_the_server_command(tmp_path, monkeypatch):
    # What zramd@.service execs: the plugin's swap=true (locked on fault,
    # IO flusher) only for a swap device; never nbdkit's --swap, which
    # locks all of nbdkit's memory.
    from zramd import attach, config
    monkeypatch.setenv("ZRAMD_RUNTIME_DIR", str(tmp_path))
    conf = tmp_path / "etc/zramd/zramd.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("[zramd0]\nzram-size=64\ncompression-algorithm=zstd(level=3)"
                    "\n[d]\nzram-size=32\nmount-point=/mnt/d\n")
    devs = config.load(str(tmp_path), ram_mib=1024)
    monkeypatch.setattr(attach, "server_filter", lambda: ("/f.so", None))
    swap = attach.server_command(devs["zramd0"], plugin="/p.py")
    assert swap == [
        "nbdkit", "--foreground", "--threads",
        str(attach.SERVER_THREADS_SWAP), "--unix", str(tmp_path / "zramd0.nbd"),
        "--filter=/f.so", "python", "/p.py", "size=%d" % (64 << 20), "algorithm=zstd",
        "level=3", "swap=true", "name=zramd0",
        "control=%s" % (tmp_path / "zramd0.sock")]
    disk = attach.server_command(devs["d"], plugin="/p.py")
    assert "swap=true" not in disk and "--foreground" in disk
    # A file system's server takes the workers this nbdkit allows; swap
    # takes one whatever nbdkit it is.
    assert disk[disk.index("--threads") + 1] == str(attach.server_threads())
    monkeypatch.setattr(attach, "nbdkit_version", lambda: (1, 42, 3))
    assert attach.server_threads() == attach.SERVER_THREADS == 4
    assert attach.server_threads(swap=True) == 1
    monkeypatch.setattr(attach, "nbdkit_version", lambda: (1, 32, 5))
    assert attach.server_threads() == 1
    assert attach.server_threads(swap=True) == 1
    env = attach.server_environment({"PATH": "/root/.pyenv/shims"})
    assert env["MALLOC_ARENA_MAX"] == str(attach.SERVER_MALLOC_ARENAS)
    assert env["PATH"].startswith("/usr/sbin:/usr/bin:")


def write_conf(root, text):
    os.makedirs(os.path.join(root, "etc/zramd"), exist_ok=True)
    os.makedirs(os.path.join(root, "proc"), exist_ok=True)
    with open(os.path.join(root, "proc/meminfo"), "w") as f:
        f.write("MemTotal:        4194304 kB\n")
    with open(os.path.join(root, "etc/zramd/zramd.conf"), "w") as f:
        f.write(text)


def run_generator(root, out):
    env = dict(os.environ, ZRAMD_CONFIG_ROOT=str(root))
    return subprocess.run([sys.executable, GENERATOR, str(out),
                           str(out) + "-early", str(out) + "-late"],
                          env=env, capture_output=True, text=True, timeout=60)


def test_generator_output_and_verify(tmp_path):
    root, out = tmp_path / "root", tmp_path / "gen"
    write_conf(str(root), "[zramd0]\nswap-priority=50\n"
               "[scratch]\nfs-type=ext4\nmount-point=/var/lib/scratch\n")
    r = run_generator(root, out)
    assert r.returncode == 0, r.stderr
    swap = out / "swap.target.wants" / "zramd-attach@zramd0.service"
    fs = out / "local-fs.target.wants" / "zramd-attach@scratch.service"
    assert swap.is_symlink() and fs.is_symlink()
    assert os.path.realpath(swap) == os.path.realpath(
        os.path.join(UNITS, "zramd-attach@.service"))
    assert not (out / "local-fs.target.wants" /
                "zramd-attach@zramd0.service").exists()
    d0 = load(str(out / "zramd-attach@zramd0.service.d/50-zramd-generator.conf"))
    assert d0["Unit"]["Before"] == ["swap.target"]
    assert d0["Unit"]["After"] == ["run-zramd-zramd0.fuse.mount"]
    d1 = load(str(out / "zramd-attach@scratch.service.d/50-zramd-generator.conf"))
    assert d1["Unit"]["Before"] == ["local-fs.target"]
    assert d1["Unit"]["RequiresMountsFor"] == ['"/var/lib"']
    # The units read zramd.conf as the generator did: unknown keys warned.
    for name in ("zramd0", "scratch"):
        for unit in ("zramd-attach@%s.service", "zramd@%s.service"):
            d = load(str(out / (unit % name + ".d") / "50-zramd-generator.conf"))
            assert d["Service"]["Environment"] == ["ZRAMD_UNKNOWN_KEYS=warn"]
    assert not os.path.exists(str(out) + "-early")   # normal dir only
    # The generated instances, with their drop-ins and wants, verify (no
    # ordering cycle with swap.target / local-fs.target either, nor with
    # Debian 13's tmp.mount, which is ordered after swap.target).
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "tmp.mount").write_text(
        "[Unit]\nAfter=swap.target\n[Mount]\nWhat=tmpfs\nWhere=/tmp\n"
        "Type=tmpfs\n")
    r = verify([str(out), UNITS, str(extra)], "zramd-attach@zramd0.service",
               "zramd-attach@scratch.service", "zramd@zramd0.service",
               "swap.target", "local-fs.target", "tmp.mount")
    assert r.returncode == 0, r.stderr
    assert "cycle" not in r.stderr


def test_generator_quotes_a_mount_point_parent_with_a_space(tmp_path):
    # Issue 17 F9: "mount-point = /mnt/a b/c" gave RequiresMountsFor=/mnt/a
    # b, which systemd split ("path is not absolute, ignoring: b").
    root, out = tmp_path / "root", tmp_path / "gen"
    write_conf(str(root), '[sp]\nfs-type=ext4\nmount-point=/mnt/a b%%1/c\n')
    r = run_generator(root, out)
    assert r.returncode == 0, r.stderr
    d = load(str(out / "zramd-attach@sp.service.d/50-zramd-generator.conf"))
    assert d["Unit"]["RequiresMountsFor"] == ['"/mnt/a b%%%%1"']
    r = verify([str(out), UNITS], "zramd-attach@sp.service")
    assert r.returncode == 0, r.stderr
    assert "not absolute" not in r.stderr and "ignoring" not in r.stderr, \
        r.stderr


def test_generator_bad_config_writes_nothing(tmp_path):
    root, out = tmp_path / "root", tmp_path / "gen"
    write_conf(str(root), "[zramd0]\n[zramd1]\nzram-size = ram / nothing\n")
    out.mkdir()
    r = run_generator(root, out)
    assert r.returncode == 1
    assert "zramd.conf:3: [zramd1] zram-size" in r.stderr
    assert os.listdir(out) == []


def test_generator_warns_on_unknown_keys_and_sets_up_the_rest(tmp_path):
    # As zram-generator: a typo or a newer zram-generator's key is reported
    # in the journal (stderr) and the machine still boots with its swap.
    root, out = tmp_path / "root", tmp_path / "gen"
    write_conf(str(root), "[zramd0]\nzram-sise = 100\nmemory-limit = none\n"
               "compression-algorithm = lzo-rle zstd(level=3) (type=idle)\n")
    r = run_generator(root, out)
    assert r.returncode == 0, r.stderr
    conf = root / "etc/zramd/zramd.conf"
    assert r.stderr.splitlines() == [
        "zramd-generator: warning: %s:2: [zramd0] zram-sise: unknown key "
        "(accepted: zram-size, compression-algorithm, swap-priority, "
        "fs-type, mount-point, options, fs-create-options, mem-limit, "
        "zram-resident-limit, host-memory-limit, writeback-device), ignored"
        % conf,
        "zramd-generator: warning: %s:3: [zramd0] memory-limit: obsolete, "
        "use host-memory-limit instead" % conf]
    assert (out / "swap.target.wants" / "zramd-attach@zramd0.service"
            ).is_symlink()
    # zramd up by hand still refuses the file.
    from zramd import config
    with pytest.raises(config.ConfigError, match="zram-sise: unknown key"):
        config.load(str(root))


def test_generator_on_zram_generators_example(tmp_path, monkeypatch):
    # zram-generator's example config, as test_config has it: on a Xen
    # guest (a fake xenstore-read) both devices come up; elsewhere its
    # set! line fails, is named, and nothing is enabled.
    from test_config import EXAMPLE
    root, out = tmp_path / "root", tmp_path / "gen"
    write_conf(str(root), EXAMPLE)
    out.mkdir()
    r = run_generator(root, out)
    assert r.returncode == 1
    assert r.stderr.startswith("zramd-generator: %s:8: set!maxhotplug: "
                               % (root / "etc/zramd/zramd.conf"))
    assert os.listdir(out) == []
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "xenstore-read").write_text("#!/bin/sh\necho 4096\n")
    (bindir / "xenstore-read").chmod(0o755)
    monkeypatch.setenv("PATH", "%s:%s" % (bindir, os.environ["PATH"]))
    r = run_generator(root, out)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert (out / "swap.target.wants/zramd-attach@zram0.service").is_symlink()
    assert (out / "local-fs.target.wants/zramd-attach@zram1.service"
            ).is_symlink()


def test_generator_no_config(tmp_path):
    out = tmp_path / "gen"
    out.mkdir()
    r = run_generator(tmp_path, out)
    assert r.returncode == 0, r.stderr
    assert os.listdir(out) == []


def test_escape_path_matches_systemd_escape():
    import importlib.machinery
    import importlib.util
    loader = importlib.machinery.SourceFileLoader("zramd_generator",
                                                  GENERATOR)
    gen = importlib.util.module_from_spec(
        importlib.util.spec_from_loader("zramd_generator", loader))
    loader.exec_module(gen)
    for path in ["/run/zramd/zramd0.fuse", "/var/compressed", "/",
                 "/foo-bar/.baz", "/a b/c", "/x/ż"]:
        want = subprocess.run(["systemd-escape", "--path", path],
                              capture_output=True, text=True).stdout.strip()
        assert gen.escape_path(path) == want, path
