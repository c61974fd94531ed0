"""Real NBD clients against the plugin: nbdcopy, qemu-img, qemu-io and fio.

Each runs against a real nbdkit on a Unix socket, with real data: a tar of
Debian's Python standard library and shared libraries, 72 MiB or more.
"""

import glob
import json
import os
import random
import subprocess
import tarfile
import threading

import pytest

from conftest import NbdClient, require
from nbdkit_server import NbdkitServer

MiB = 1 << 20
CORPUS_MIN = 72 * MiB


def run(*args, ok=(0,), timeout=300, cwd=None):
    """Run a client; return it, asserting its exit status is in ``ok``."""
    done = subprocess.run(list(args), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd)
    assert done.returncode in ok, "%s exited %d:\n%s\n%s" % (
        args[0], done.returncode, done.stdout[-3000:], done.stderr[-3000:])
    return done


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tar of /usr/lib/python3.11 and shared libraries, at least 72 MiB,
    padded with zeroes to whole 4 KiB sectors."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.tar"
    sources = ["/usr/lib/python3.11"] + sorted(
        glob.glob("/usr/lib/x86_64-linux-gnu/*.so*"))
    with tarfile.open(path, "w") as tar:
        for source in sources:
            if os.path.islink(source) or not os.path.exists(source):
                continue
            tar.add(source)
            if tar.fileobj.tell() >= CORPUS_MIN:
                break
    size = os.path.getsize(path)
    if size < CORPUS_MIN:
        pytest.skip("only %d bytes of system files to copy" % size)
    with open(path, "ab") as f:
        f.write(bytes(-size % 4096))
    return str(path)


@pytest.fixture(scope="module")
def disk(tmp_path_factory, corpus):
    """A server exactly the corpus's size, for whole-disk copies."""
    require("nbdkit")
    server = NbdkitServer(tmp_path_factory.mktemp("disk"),
                          size=str(os.path.getsize(corpus)))
    yield server
    assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log(), server.log()


def test_nbdcopy_round_trip(disk, corpus, tmp_path):
    require("nbdcopy", "cmp")
    run("nbdcopy", corpus, disk.uri)
    back = tmp_path / "back.img"
    run("nbdcopy", disk.uri, str(back))
    run("cmp", corpus, str(back))
    # Also nbd to nbd, through a second server with more room than needed.
    with NbdkitServer(tmp_path / "second",
                      size=str(os.path.getsize(corpus) + 8 * MiB)) as second:
        run("nbdcopy", disk.uri, second.uri)
        run("nbdcopy", second.uri, str(tmp_path / "second.img"))
    with open(tmp_path / "second.img", "rb") as f:
        head = f.read(os.path.getsize(corpus))
        tail = f.read()
    with open(corpus, "rb") as f:
        assert head == f.read()
    assert tail == bytes(8 * MiB)


def test_nbdcopy_finds_the_difference(disk, corpus, tmp_path):
    """The round trip's cmp can fail: change one byte on the disk."""
    require("nbdcopy", "cmp")
    run("nbdcopy", corpus, disk.uri)
    with NbdClient(disk.uri) as h:
        byte = h.pread(1, 12345)
        h.pwrite(bytes([byte[0] ^ 0xFF]), 12345)
    back = tmp_path / "back.img"
    run("nbdcopy", disk.uri, str(back))
    done = run("cmp", corpus, str(back), ok=(1,))
    assert "byte 12346" in done.stdout


@pytest.fixture
def server(nbdkit_server):
    return nbdkit_server(size="64M")


def test_qemu_img_convert_and_compare(server, corpus, tmp_path):
    require("qemu-img", "qemu-io")
    # A 64 MiB raw image: 24 MiB of corpus, a 16 MiB hole, 8 MiB more.
    image = tmp_path / "image.raw"
    with open(corpus, "rb") as src, open(image, "wb") as dst:
        dst.write(src.read(24 * MiB))
        dst.seek(40 * MiB)
        dst.write(src.read(8 * MiB))
        dst.truncate(64 * MiB)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image),
        server.uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image),
        server.uri)
    # The hole and the tail were never written: qemu-img sees them as zero.
    extents = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw",
                             server.uri).stdout)
    zero = [(e["start"], e["length"]) for e in extents if e["zero"]]
    assert any(s <= 25 * MiB and s + n >= 40 * MiB for s, n in zero), zero
    assert any(s <= 48 * MiB and s + n == 64 * MiB for s, n in zero), zero
    # Change one sector on the disk: compare must now see it.
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 4k", server.uri)
    done = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image),
               server.uri, ok=(1,))
    assert "Content mismatch at offset 1048576" in done.stdout
    # And back out: convert from the disk to a file, byte for byte.
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, str(out))
    with open(image, "r+b") as f:
        f.seek(1 * MiB)
        f.write(b"\x5a" * 4096)
    run("cmp", str(image), str(out))


def qemu_io(uri, *commands, ok=(0,)):
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    return run(*args, uri, ok=ok)


def test_qemu_io_aligned_and_unaligned(server):
    require("qemu-io")
    done = qemu_io(
        server.uri,
        "write -P 0x11 0 64k",                  # aligned
        "write -P 0x22 4096 4096",
        "write -P 0x33 1000 333",               # inside one sector
        "write -P 0x44 8000 10000",             # across three sectors
        "write -P 0x55 65535 1",                # the last byte of a sector
        "read -P 0x11 0 1000",
        "read -P 0x33 1000 333",
        "read -P 0x11 1333 2763",
        "read -P 0x22 4096 3904",
        "read -P 0x44 8000 10000",
        "read -P 0x11 18000 47535",
        "read -P 0x55 65535 1",
        "read -P 0 65536 4096",                 # never written
        "writev -P 0x66 70000 100 3000 5000",   # vectored, unaligned
        "readv -P 0x66 70000 8100",
        "write -z 70100 3000",                  # write zeroes, unaligned
        "read -P 0x66 70000 100",
        "read -P 0 70100 3000",
        "read -P 0x66 73100 5000",
        "discard 128k 64k",
        "read -P 0 128k 64k",
        "flush",
    )
    assert "verification failed" not in done.stdout + done.stderr
    assert done.stdout.count("read ") >= 12
    # The pattern checks are real: a wrong one fails.
    wrong = qemu_io(server.uri, "read -P 0x34 1000 333", ok=(1,))
    assert "Pattern verification failed" in wrong.stdout + wrong.stderr


def test_fio_verify_several_connections(server, tmp_path):
    """fio's nbd engine, four jobs (one connection each) writing their own
    16 MiB at random with mixed block sizes, then verifying crc32c."""
    require("fio")
    output = tmp_path / "fio.json"
    run("fio", "--name=zramd", "--ioengine=nbd", "--uri=" + server.uri,
        "--rw=randwrite", "--bsrange=4k-64k", "--size=16M", "--numjobs=4",
        "--offset_increment=16M", "--iodepth=8", "--verify=crc32c",
        "--do_verify=1", "--verify_fatal=1", "--group_reporting=0",
        "--output-format=json", "--output=" + str(output), cwd=tmp_path)
    jobs = json.loads(output.read_text())["jobs"]
    assert len(jobs) == 4
    for job in jobs:
        assert job["error"] == 0
        assert job["write"]["io_bytes"] == 16 * MiB
        assert job["read"]["io_bytes"] == 16 * MiB      # the verify pass
    # fio's data really is on the disk: its verify headers are there.
    with NbdClient(server.uri) as h:
        for job in range(4):
            assert h.pread(4096, job * 16 * MiB) != bytes(4096)


# fio's verify_pattern for the mixed test: "zramd" then the block's offset
# (%o, 8 bytes little-endian), repeated through each 16 KiB block.  Every
# write to a block puts the same bytes there, so the disk's contents do not
# depend on how writes and trims interleave, only on which came last.
MIXED_RANGE = 32 * MiB
MIXED_BLOCK = 16 * 1024
SECTOR = 4096
MIXED_PATTERN = b"zramd"


def mixed_block(offset):
    """The bytes fio writes in the block at ``offset``."""
    unit = MIXED_PATTERN + offset.to_bytes(8, "little")
    return (unit * (MIXED_BLOCK // len(unit) + 1))[:MIXED_BLOCK]


def mixed_mismatch(data, offset):
    """Where ``data``, read at ``offset``, has a 4 KiB sector (or the part
    of one it covers) that is neither fio's bytes for it nor zeroes
    (trimmed, or not written yet); None if there is none.  Each sector is
    read whole under its slot lock, so only whole sectors can differ."""
    end = offset + len(data)
    pos = offset
    while pos < end:
        stop = min((pos // SECTOR + 1) * SECTOR, end)
        piece = data[pos - offset:stop - offset]
        block = pos // MIXED_BLOCK * MIXED_BLOCK
        want = mixed_block(block)[pos - block:stop - block]
        if piece != want and piece != bytes(len(piece)):
            return "bytes %d..%d: neither fio's pattern nor zeroes" % (
                pos, stop)
        pos = stop
    return None


def test_fio_mixed_read_write_with_trim(server, tmp_path):
    """A writer, a trimmer and readers at once over the same 32 MiB, each
    on its own connection, and the data checked: every read racing them,
    and the whole disk afterwards, finds in each sector either fio's bytes
    for it or zeroes; what was never trimmed holds fio's bytes; nothing
    lands past the range."""
    require("fio")
    output = tmp_path / "fio.json"
    stop = threading.Event()
    checked = []
    problems = []

    def check_reads():
        # Reads of 512 B to 128 KiB anywhere in the range, as fio's reader
        # makes, but checked against the model while the jobs run.
        rng = random.Random(10)
        with NbdClient(server.uri) as h:
            while not problems:
                length = rng.randrange(512, 128 * 1024 + 1)
                offset = rng.randrange(MIXED_RANGE - length + 1)
                problem = mixed_mismatch(h.pread(length, offset), offset)
                if problem:
                    problems.append(problem)
                checked.append(length)
                if stop.is_set():
                    return

    reader = threading.Thread(target=check_reads)
    reader.start()
    try:
        # The writer covers every 16 KiB block once per loop (fio's random
        # map), four loops; the trimmer takes half the range's 64 KiB
        # blocks, each once, paced (not timed) to spread over the writes.
        run("fio", "--ioengine=nbd", "--uri=" + server.uri, "--iodepth=4",
            "--output-format=json", "--output=" + str(output),
            "--name=write", "--rw=randwrite", "--bs=16k", "--size=32M",
            "--loops=4", "--verify=pattern", "--verify_pattern=0x%s%%o"
            % MIXED_PATTERN.hex(), "--do_verify=0",
            "--name=trim", "--rw=randtrim", "--bs=64k", "--size=32M",
            "--io_size=16M", "--rate_iops=200",
            "--name=read", "--rw=randread", "--bsrange=512-128k",
            "--size=32M", "--loops=2",
            # Then, alone, trim the first MiB: it must read back zero.
            "--name=trim-last", "--stonewall", "--rw=trim", "--bs=64k",
            "--size=1M", cwd=tmp_path)
    finally:
        stop.set()
        reader.join(120)
    assert not reader.is_alive(), "the checking reader hangs"
    assert not problems, problems
    assert checked
    jobs = {job["jobname"]: job for job in
            json.loads(output.read_text())["jobs"]}
    assert all(job["error"] == 0 for job in jobs.values()), jobs
    assert jobs["write"]["write"]["io_bytes"] == 4 * MIXED_RANGE
    assert jobs["trim"]["trim"]["io_bytes"] == MIXED_RANGE // 2
    assert jobs["read"]["read"]["io_bytes"] == 2 * MIXED_RANGE
    assert jobs["trim-last"]["trim"]["io_bytes"] == MiB
    # Afterwards: the MiB trimmed last is zeroes; each other sector fio's
    # bytes or zeroes, and at most the 16 MiB the trimmer took is zeroes,
    # since every block was written.
    zero_sectors = 0
    with NbdClient(server.uri) as h:
        assert h.pread(MiB, 0) == bytes(MiB)
        for offset in range(MiB, MIXED_RANGE, MiB):
            data = h.pread(MiB, offset)
            assert mixed_mismatch(data, offset) is None, \
                mixed_mismatch(data, offset)
            zero_sectors += sum(
                data[i:i + SECTOR] == bytes(SECTOR)
                for i in range(0, MiB, SECTOR))
        assert zero_sectors <= MIXED_RANGE // 2 // SECTOR
        for offset in range(MIXED_RANGE, 64 * MiB, MiB):
            assert h.pread(MiB, offset) == bytes(MiB), offset
