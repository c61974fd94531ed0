"""zramd.params: nbdkit's size rules, every key's validation, and messages
that name the key and what is accepted."""

import json
import os
import socket
import subprocess
import textwrap

import pytest

from conftest import require
from zramd import params
from zramd.errors import ConfigError
from zramd.params import ParamParser, parse_size

K, M, G, T, P, E = (1 << s for s in (10, 20, 30, 40, 50, 60))


@pytest.mark.parametrize("text, size", [
    ("0", 0), ("4096", 4096), ("10b", 10), ("10B", 10),
    ("1k", K), ("1K", K), ("512M", 512 * M), ("512m", 512 * M),
    ("1G", G), ("3g", 3 * G), ("2T", 2 * T), ("1P", P), ("7E", 7 * E),
    ("8s", 4096), ("8S", 4096), (" 5", 5), ("\t5", 5), ("+5", 5), ("-0", 0),
    ("9223372036854775807", (1 << 63) - 1),
])
def test_parse_size_accepts_nbdkit_forms(text, size):
    assert parse_size("size", text) == size


@pytest.mark.parametrize("text", [
    "", "G", "1Q", "1GB", "1GiB", "1.5G", "0x10", "5 ", "1 G", "-1", "-1G",
    "8E", "9223372036854775808", "99999999999999999999k", "١٢",
])
def test_parse_size_refuses_with_the_key_and_the_forms(text):
    with pytest.raises(ConfigError) as e:
        parse_size("mem_limit", text)
    assert e.value.message.startswith("mem_limit: %r is " % text)
    assert "\n" not in e.value.message
    if "too large" not in e.value.message:
        assert "suffix" in e.value.message


def test_parse_size_agrees_with_nbdkit(tmp_path):
    """The same answers as nbdkit_parse_size() itself, through nbdkit."""
    require("nbdkit")
    samples = ["0", "4096", "1k", "1K", "512M", "1G", "2T", "1P", "7E", "8s",
               "10b", " 5", "+5", "-0", "9223372036854775807",
               "", "G", "1Q", "1GB", "1.5G", "0x10", "5 ", "-1", "8E",
               "9223372036854775808"]
    script = tmp_path / "parse_size.py"
    script.write_text(textwrap.dedent("""\
        import json, nbdkit
        API_VERSION = 2
        def dump_plugin():
            out = {}
            for text in %r:
                try:
                    out[text] = nbdkit.parse_size(text)
                except ValueError:
                    out[text] = None
            print("parse_size=" + json.dumps(out))
        def open(readonly): return 1
        def get_size(h): return 0
        def pread(h, buf, offset, flags): pass
        """ % (samples,)))
    run = subprocess.run(["nbdkit", "python", str(script), "--dump-plugin"],
                         capture_output=True, text=True, timeout=60)
    line = [l for l in run.stdout.splitlines() if l.startswith("parse_size=")]
    assert line, run.stdout + run.stderr
    theirs = json.loads(line[0].split("=", 1)[1])
    ours = {}
    for text in samples:
        try:
            ours[text] = parse_size("size", text)
        except ConfigError:
            ours[text] = None
    assert ours == theirs
    assert sum(v is None for v in ours.values()) == 10     # both kinds seen


def parsed(*pairs, **complete_kwargs):
    parser = ParamParser()
    for pair in pairs:
        parser.set(*pair.split("=", 1))
    return parser.complete(**complete_kwargs)


def refused(*pairs, **complete_kwargs):
    with pytest.raises(ConfigError) as e:
        parsed(*pairs, **complete_kwargs)
    assert "\n" not in e.value.message
    return e.value.message


def test_defaults(runtime_dir):
    p = parsed("size=1G")
    assert p == params.Params(size=G, algorithm="lz4", level=None,
                              dict_path=None, mem_limit=0, chain_size=8,
                              name="zramd0",
                              control=str(runtime_dir / "zramd0.sock"))
    kwargs = p.device_kwargs()
    assert {key: kwargs[key] for key in ("size", "algorithm", "level",
                                         "dict_path", "mem_limit",
                                         "chain_size")} == dict(
        size=G, algorithm="lz4", level=None, dict_path=None, mem_limit=0,
        chain_size=8)


def test_every_key(runtime_dir, tmp_path):
    dictionary = tmp_path / "d.zstd"
    dictionary.write_bytes(b"zramd dictionary " * 64)
    p = parsed("size=64M", "algorithm=zstd", "level=5",
               "dict=%s" % dictionary, "mem_limit=8M", "chain_size=16",
               "name=swap0", "control=%s" % (tmp_path / "c.sock"))
    assert p == params.Params(size=64 * M, algorithm="zstd", level=5,
                              dict_path=str(dictionary), mem_limit=8 * M,
                              chain_size=16, name="swap0",
                              control=str(tmp_path / "c.sock"))


def test_default_control_follows_name(runtime_dir):
    assert parsed("size=4096", "name=disk.1").control == \
        os.path.join(str(runtime_dir), "disk.1.sock")


def test_unknown_key_lists_the_accepted_ones():
    message = refused("size=1G", "sise=2G")
    assert message == ("sise: unknown parameter; accepted: "
                       + ", ".join(params.KEYS))
    assert params.KEYS[:8] == ("size", "algorithm", "level", "dict",
                               "mem_limit", "chain_size", "name", "control")


def test_key_given_twice():
    assert refused("size=1G", "size=2G") == "size: given twice ('1G', then '2G')"


def test_size_whose_slot_table_exceeds_the_ram_is_one_line(tmp_path):
    # size=1P used to fail in after_fork with a MemoryError traceback.
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        1048576 kB\n")          # 1 GiB
    params._check_slot_table(256 << 30, str(meminfo))       # 1 GiB table
    with pytest.raises(ConfigError) as exc:
        params._check_slot_table((256 << 30) + 4096, str(meminfo))
    assert exc.value.message == (
        "size: 274877911040 bytes needs a slot table of 1024 MiB (16 bytes "
        "per 4 KiB), more than this machine's 1024 MiB of RAM")


def test_size_is_required():
    assert refused("algorithm=lz4").startswith("size: required;")


@pytest.mark.parametrize("value", ["0", "1000", "4097", "1s"])
def test_size_must_be_a_positive_multiple_of_4096(value):
    message = refused("size=" + value)
    assert message.startswith("size: %r is " % value)
    assert "positive multiple of 4096" in message


def test_malformed_size_names_the_key():
    assert refused("size=1Q").startswith("size: '1Q' is not a size;")
    assert refused("size=1G", "mem_limit=lots").startswith(
        "mem_limit: 'lots' is not a size;")


def test_mem_limit_zero_means_none(runtime_dir):
    assert parsed("size=1G", "mem_limit=0").mem_limit == 0


@pytest.mark.parametrize("value, message", [
    ("3", "chain_size: 3 is out of range; accepted: 4..16"),
    ("17", "chain_size: 17 is out of range; accepted: 4..16"),
    ("eight", "chain_size: 'eight' is not a number; accepted: 4..16"),
])
def test_chain_size_range(value, message):
    assert refused("size=1G", "chain_size=" + value) == message


def test_chain_size_bounds_accepted(runtime_dir):
    assert parsed("size=1G", "chain_size=4").chain_size == 4
    assert parsed("size=1G", "chain_size=16").chain_size == 16


@pytest.mark.parametrize("value", ["", "a/b", "../x", ".hidden", "-x",
                                   "x" * 65, "sp ace"])
def test_name_must_make_a_file_name(value):
    assert refused("size=1G", "name=" + value).startswith(
        "name: %r is not a device name; accepted:" % value)


def test_level_must_be_an_integer():
    assert refused("size=1G", "level=high").startswith(
        "level: 'high' is not a number")


def test_unknown_algorithm_lists_the_registered_ones(runtime_dir):
    from zramd import compress
    assert refused("size=1G", "algorithm=842") == (
        "algorithm: unknown '842'; accepted: " + " ".join(compress.names()))


def test_level_out_of_range_names_level(runtime_dir):
    message = refused("size=1G", "algorithm=lz4hc", "level=99")
    assert message.startswith("level: ") and "accepted" in message


def test_unreadable_dictionary_names_dict(runtime_dir, tmp_path):
    message = refused("size=1G", "algorithm=zstd",
                      "dict=%s" % (tmp_path / "missing"))
    assert message == ("dict: cannot read %s: No such file or directory; "
                       "accepted: a readable zstd dictionary file"
                       % (tmp_path / "missing"))
    assert refused("size=1G", "algorithm=zstd",
                   "dict=%s" % tmp_path).startswith("dict: cannot read ")


def test_dictionary_for_an_algorithm_without_one_names_dict(runtime_dir,
                                                            tmp_path):
    dictionary = tmp_path / "d"
    dictionary.write_bytes(b"x" * 100)
    message = refused("size=1G", "algorithm=lz4", "dict=%s" % dictionary)
    assert message.startswith("dict: ") and "zstd" in message


def test_compressor_check_can_be_left_out():
    p = parsed("size=1G", "algorithm=nonesuch", check_compressor=False,
               check_control=False)
    assert p.algorithm == "nonesuch"


def test_control_socket_in_use_is_refused(tmp_path):
    path = str(tmp_path / "busy.sock")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(path)
        live.listen(1)
        assert refused("size=1G", "control=" + path) == (
            "control: %s is in use by another running zramd; accepted: a "
            "free path (or a different name=)" % path)


def test_stale_control_socket_is_fine(tmp_path):
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()                       # the file stays, nobody listens
    assert parsed("size=1G", "control=" + path).control == path


def test_help_text_has_a_line_per_key():
    lines = params.help_text().splitlines()
    assert [line.split("=", 1)[0] for line in lines] == list(params.KEYS)
    assert lines[0].startswith("size=<SIZE>") and "(required)" in lines[0]


@pytest.mark.parametrize("pairs, message", [
    (("policy_writeback=idle",),
     "policy_writeback: the policy runs only with policy_interval=SECONDS"),
    (("policy_idle_age=60",),
     "policy_idle_age: the policy runs only with policy_interval=SECONDS"),
    (("policy_interval=0", "policy_max_pages=5"),
     "policy_max_pages: the policy runs only with policy_interval=SECONDS"),
    (("policy_interval=10", "policy_writeback=idle"),
     "policy_writeback: nothing to write back to; accepted with "
     "backing_dev=PATH"),
    (("policy_interval=10", "policy_recompress=idle"),
     "policy_recompress: no algorithm to recompress with; accepted with "
     "recomp_algorithm=ALGO"),
])
def test_policy_that_could_never_act_is_refused(runtime_dir, pairs, message):
    assert refused("size=1G", *pairs).startswith(message)


def test_policy_with_what_it_needs(runtime_dir, tmp_path):
    backing = tmp_path / "wb"
    backing.write_bytes(bytes(1 << 20))
    backing.chmod(0o600)
    p = parsed("size=1G", "policy_interval=10", "policy_idle_age=60",
               "policy_writeback=idle", "backing_dev=%s" % backing,
               "policy_recompress=huge", "recomp_algorithm=zstd")
    assert p.policy_kwargs() == dict(interval=10, idle_age=60,
                                     recompress_type="huge",
                                     writeback_type="idle", max_pages=0)
