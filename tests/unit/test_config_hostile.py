"""Hostile and careless config input (issue 10): non-ASCII digits are errors, not tracebacks;
a non-regular or oversized file is refused before it is read; an error never echoes a word
that is not config text (a reload of /etc/shadow must not put a hash in the reply or log); a
config without rules is refused unless it says `allow_empty yes`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from snatgw.config import parse as P
from snatgw.config.adm import AdmUsageError, parse_args
from snatgw.config.parse import parse_file, parse_text, require_rules
from snatgw.errors import ConfigError

RULE = "virtual_server fwmark 1 {\n snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71 }\n}\n"
SHADOW = ("root:$y$j9T$Xq1ZTopSecretSaltAndHash0123456789abcdefghijklmnopq/:19700:0:99999:7:::\n"
          "daemon:*:19700:0:99999:7:::\n")


def err(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        parse_text(text, "t.conf", [])
    return ei.value


@pytest.mark.parametrize("digits", ["²", "١٢", "１２", "1²"])
@pytest.mark.parametrize("setting", ["max_sessions {}", "port_tries {}", "port_range 5000-{}",
                                     "timeout udp {}", "gc_interval {}"])
def test_non_ascii_digits_are_config_errors(setting, digits):
    """'²' passes str.isdigit() (int() then raises) and '١٢' is read as 12 by int(): both are
    errors naming file:line and the setting (a timeout's with its state: `timeout udp`)."""
    e = err("snatgw {\n " + setting.format(digits) + "\n}\n" + RULE)
    field = "timeout udp" if setting.startswith("timeout") else setting.split()[0]
    assert e.where == "t.conf:2" and e.field == field


@pytest.mark.parametrize("plen", ["²", "١٢"])
def test_non_ascii_prefix_length_is_a_rule_error(plen):
    e = err("virtual_server fwmark 1 {\n snat_rule { from 198.18.40.0/" + plen
            + " snat_ip 198.19.2.71 }\n}\n")
    assert e.field == "from" and "prefix length" in str(e)


def test_adm_fwmark_in_non_ascii_digits_is_a_usage_error():
    with pytest.raises(AdmUsageError):
        parse_args(["-A", "-f", "١", "-s", "snat_sched"])


def test_check_prints_an_error_not_a_traceback_for_superscript_digits(tmp_path):
    conf = tmp_path / "sup.conf"
    conf.write_text("snatgw {\n max_sessions 1²\n}\n" + RULE, encoding="utf-8")
    p = subprocess.run([sys.executable, "-m", "snatgw.cli.main", "check", str(conf)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "sup.conf:2: max_sessions: expected an integer" in p.stderr


def test_a_windows_editors_file_is_read(tmp_path):
    """A file saved by a Windows editor (a UTF-8 byte order mark, CR LF line ends) reads as the
    same file without them, its lines numbered alike; a BOM anywhere else is still a stray
    character, named."""
    text = "snatgw {\n inside lan40\n outside eth1\n}\n" + RULE
    plain, win = tmp_path / "plain.conf", tmp_path / "win.conf"
    plain.write_bytes(text.encode())
    win.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    a, b = parse_file(plain), parse_file(win)
    assert a.settings == b.settings and a.settings.inside == ("lan40",)
    assert [r.where.rsplit(":", 1)[1] for r in b.rules] == [r.where.rsplit(":", 1)[1] for r in a.rules] == ["6"]
    win.write_bytes(text.replace(" inside", "\ufeff inside").encode())
    with pytest.raises(ConfigError, match="U[+]FEFF") as ei:
        parse_file(win)
    assert ei.value.where == f"{win}:2"


def test_dev_zero_is_refused_before_reading():
    with pytest.raises(ConfigError, match="not a regular file"):
        parse_file("/dev/zero")


def test_a_fifo_without_writer_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out: list = []
    t = threading.Thread(target=lambda: out.append(pytest.raises(ConfigError, parse_file, fifo)), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive() and "not a regular file" in str(out[0].value)


def test_an_oversized_file_is_refused_by_its_size(tmp_path):
    big = tmp_path / "big.conf"
    with open(big, "wb") as f:
        f.truncate(P.MAX_CONFIG_BYTES + 1)  # sparse: nothing is written, nothing must be read
    with pytest.raises(ConfigError, match="larger than"):
        parse_file(big)


def test_errors_never_echo_a_word_that_is_not_config_text(tmp_path):
    """A shadow-like file: the error says where and what, and no byte of the hash."""
    shadow = tmp_path / "shadow"
    shadow.write_text(SHADOW)
    with pytest.raises(ConfigError) as ei:
        parse_file(shadow)
    msg = str(ei.value)
    assert "shadow:1" in msg and "unknown top-level keyword" in msg
    assert "j9T" not in msg and "TopSecret" not in msg and "99999" not in msg
    # words that are config text are still quoted, so ordinary mistakes stay easy to find
    assert "snatgx" in str(err("snatgx {\n}\n"))
    e = err("snatgw {\n backend \x1b[31mbpf\n}\n" + RULE)
    assert "\x1b" not in str(e) and "not shown" in str(e)


@pytest.mark.parametrize("text", ["", "\n\n# nothing\n", "snatgw {\n inside lan40\n}\n",
                                  "virtual_server fwmark 1 {\n}\n"])
def test_a_config_without_rules_is_refused(text):
    cfg = parse_text(text, "empty.conf")
    with pytest.raises(ConfigError, match="allow_empty yes") as ei:
        require_rules(cfg)
    assert ei.value.where == "empty.conf"


def test_no_rules_with_a_skipped_include_names_the_include():
    """A keepalived.conf whose rules are in an included file: snatgw skips `include` (a warning
    the error hides), so the refusal names the include line and says it is not followed; it
    asked only whether the file was empty or truncated."""
    cfg = parse_text("snatgw {\n inside lan40\n}\ninclude /etc/keepalived/snat.conf\n", "k.conf", [])
    with pytest.raises(ConfigError) as ei:
        require_rules(cfg)
    assert "an `include` names (k.conf:4): snatgw does not follow include" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        require_rules(parse_text("snatgw {\n inside lan40\n}\n", "k.conf", []))
    assert "include" not in str(ei.value)


def test_allow_empty_yes_runs_without_rules_on_purpose():
    cfg = require_rules(parse_text("snatgw {\n allow_empty yes\n}\n", "e.conf"))
    assert len(cfg.rules) == 0 and cfg.settings.allow_empty
    assert "allow_empty yes" in P.render_config(cfg)
    assert err("snatgw {\n allow_empty maybe\n}\n").field == "allow_empty"


def test_check_refuses_an_empty_file(tmp_path):
    conf = tmp_path / "empty.conf"
    conf.write_text("")
    p = subprocess.run([sys.executable, "-m", "snatgw.cli.main", "check", str(conf)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "no snat_rule" in p.stderr



def test_a_control_socket_path_too_long_for_a_unix_socket_is_a_config_error(tmp_path):
    """`check` said valid and the daemon failed to start with only "AF_UNIX path too long";
    the config names the line, and `run --socket` (no config line) names the path."""
    e = err("snatgw {\n control_socket /run/" + "a" * 110 + "/x.sock\n}\n" + RULE)
    assert e.where == "t.conf:2" and e.field == "control_socket" and "107 bytes" in str(e)
    assert parse_text("snatgw {\n control_socket /" + "a" * 106 + "\n}\n" + RULE, "t.conf", [])
    from snatgw.daemon.control import ControlServer
    from snatgw.errors import DaemonError

    long = str(tmp_path / ("b" * 120))
    with pytest.raises(DaemonError, match="longer than 107 bytes"):
        ControlServer(long, lambda r: r)


@pytest.mark.parametrize("text,line,word,col,keyword", [
    ("virtual_serv\u0430r fwmark 1 {\n snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71 }\n}\n",
     1, "virtual_serv\u0430r", 13, "virtual_server"),  # Cyrillic a
    ("snatgw {\n  port_r\u0430nge 5000-6000\n}\n" + RULE, 2, "port_r\u0430nge", 9, "port_range"),
    ("virtual_server fwmark 1 {\n snat_rule { from 198.18.40.0/24 sn\u0430t_ip 198.19.2.71 }\n}\n",
     2, "sn\u0430t_ip", 36, "snat_ip"),
    ("snatgw {\n \uff50ort_range 5000\n}\n" + RULE, 2, "\uff50ort_range", 2, "port_range"),  # fullwidth p
])
def test_a_homoglyph_keyword_is_named_with_its_column_and_the_keyword_it_resembles(text, line, word, col,
                                                                                    keyword):
    """A keyword with a look-alike letter reads right on screen: the error names the word as
    written, the character (code point) and its column, and the keyword it resembles."""
    e = err(text)
    assert e.where == f"t.conf:{line}" and e.field == word
    assert f"non-ASCII character U+{ord(next(c for c in word if ord(c) > 127)):04X}" in e.message
    assert f"at column {col}," in e.message and ascii(word) in e.message
    assert f"did you mean '{keyword}'?" in e.message


def test_an_ascii_typo_of_a_keyword_gets_a_suggestion_and_a_secret_with_non_ascii_is_not_shown():
    assert "did you mean 'port_range'?" in err("snatgw {\n port_rnage 5000\n}\n" + RULE).message
    e = err("snatgw {\n r\u00f6\u00f6t:$y$j9T$TopSecretHash 1\n}\n" + RULE)
    assert e.field == "(word not shown)" and "TopSecret" not in str(e) and "U+00F6" in e.message


@pytest.mark.parametrize("text,field,escaped", [
    ("snatgw {\n inside l\u0430n40\n}\n" + RULE, "inside", "'l\\u0430n40'"),
    ("virtual_server fwmark 1 {\n snat_rule { from 198.18.40.0/24 oif \u0435th1 snat_ip 198.19.2.71 }\n}\n",
     "oif", "'\\u0435th1'"),
])
def test_an_interface_name_with_a_look_alike_letter_is_an_error(text, field, escaped):
    """`oif еth1` (Cyrillic е) passed check and named no device: nft's oifname matched nothing,
    silently.  An interface name is ASCII; the error shows the name escaped and the letter."""
    e = err(text)
    assert e.where == "t.conf:2" and e.field == field and escaped in e.message
    assert "U+04" in e.message and "look-alike" in e.message


def test_a_value_with_a_look_alike_letter_is_shown_escaped_not_hidden():
    e = err("snatgw {\n backend nf\u0442\n}\n" + RULE)
    assert "'nf\\u0442'" in e.message and "U+0442, CYRILLIC SMALL LETTER TE" in e.message


def test_run_checks_the_interface_names_it_is_given_on_the_command_line():
    """`snatgw run --inside lаn40` bypassed the config's checks (the start then said the device
    does not exist, naming what looks like lan40)."""
    import argparse

    from snatgw.daemon.main import overrides_from, register
    from snatgw.errors import SnatgwError

    p = argparse.ArgumentParser()
    register(p)
    with pytest.raises(SnatgwError, match=r"--inside: expected an interface name in ASCII, got 'l\\u0430n40'"):
        overrides_from(p.parse_args(["x.conf", "--inside", "lan50", "--inside", "l\u0430n40"]))
    with pytest.raises(SnatgwError, match="--outside: expected an interface name of 1..15"):
        overrides_from(p.parse_args(["x.conf", "--outside", "e" * 16]))
    assert overrides_from(p.parse_args(["x.conf", "--inside", "lan40", "--outside", "eth1"])) == \
        {"inside": ("lan40",), "outside": ("eth1",)}


@pytest.mark.parametrize("argv,error", [
    (["--gc-interval", "nan"], "--gc-interval: expected seconds, a number > 0 and <= 3600 (as gc_interval), got nan"),
    (["--gc-interval", "inf"], "--gc-interval: expected seconds, a number > 0 and <= 3600 (as gc_interval), got inf"),
    (["--gc-interval", "7200"], "got 7200"),
    (["--gc-interval", "0"], "got 0"),
    (["--socket", "ctl.sock"], "--socket: expected an absolute path, got 'ctl.sock'"),
    (["--inside", "lan40", "--inside", "lan40"], "--inside: interface lan40 given twice"),
])  # fmt: skip
def test_run_checks_its_other_overrides_as_the_config_checks_the_settings(argv, error):
    """`snatgw run --gc-interval nan` (or inf, or 7200) started a daemon: nan > 0 is false
    but so is nan <= 0, and the config's gc_interval refuses all three; a relative --socket
    and an interface given twice were taken too."""
    import argparse

    from snatgw.daemon.main import overrides_from, register
    from snatgw.errors import SnatgwError

    p = argparse.ArgumentParser()
    register(p)
    with pytest.raises(SnatgwError) as ei:
        overrides_from(p.parse_args(["x.conf", *argv]))
    assert error in str(ei.value)


@pytest.mark.parametrize("over,where", [
    ({"inside": ("eth1",)}, "interface eth1 is listed both inside (--inside) and outside (t.conf:3)"),
    ({"inside": ("lan40",), "outside": ("lan40",)}, "interface lan40 is listed both inside (--inside) and "
                                                    "outside (--outside)"),
])  # fmt: skip
def test_run_refuses_an_interface_both_inside_and_outside_through_its_flags(tmp_path, over, where):
    """`run --inside eth1` with the file's `outside eth1` (or --inside X --outside X) started
    with both programs on one device, which the config itself refuses."""
    from snatgw.daemon.service import load_config
    from snatgw.errors import SnatgwError

    conf = tmp_path / "t.conf"
    conf.write_text("snatgw {\n inside lan40\n outside eth1 eth2\n}\n" + RULE)
    with pytest.raises(SnatgwError, match="listed both") as ei:
        load_config(str(conf), overrides=over)
    assert str(ei.value) == where.replace("t.conf", str(conf))
    assert load_config(str(conf), overrides={"inside": ("lan50",)}).settings.inside == ("lan50",)


@pytest.mark.parametrize("name", [".", "..", "eth0:1"])
def test_an_interface_name_no_device_can_have_is_refused_with_why(name):
    """The kernel refuses `.`, `..` and names with ':' or white space (dev_valid_name); the
    config took them and a start then said only that no such device exists (an `oif eth0:1`,
    an address label, names no device)."""
    with pytest.raises(ConfigError, match="no device can be named so") as ei:
        parse_text("snatgw {\n inside lan40\n}\nvirtual_server fwmark 1 {\n snat_rule { from 198.18.40.0/24 "
                   f"oif {name} snat_ip 198.19.2.71 }}\n}}\n", "t.conf", [])
    assert str(ei.value).startswith("t.conf:5: oif: ")


@pytest.mark.parametrize("name", ["eth*", 'a"b', "a\\b"])
def test_an_interface_name_nft_would_read_as_a_wildcard_or_quoting_is_refused(name):
    """The kernel allows '*', '"' and '\\' in a device name, but nft reads a trailing '*' as a
    wildcard (`oifname "eth*"` compares the prefix "eth": every eth device on nft, none on bpf)
    and '"' and '\\' as quoting (the nft text export then failed to load): refused by name, in a
    config file, an `adm --oif` and the daemon's --inside/--outside alike."""
    from snatgw.config.adm import parse_args
    from snatgw.errors import SnatgwError

    with pytest.raises(ConfigError, match="without '\\*', '\"' or a backslash") as ei:
        parse_text("snatgw {\n inside lan40\n}\nvirtual_server fwmark 1 {\n snat_rule { from 198.18.40.0/24 "
                   f"oif {name} snat_ip 198.19.2.71 }}\n}}\n", "t.conf", [])
    assert str(ei.value).startswith("t.conf:5: oif: ") and "wildcard" in str(ei.value)
    with pytest.raises(SnatgwError, match="nft reads"):
        parse_args(["-K", "--oif", name])
    with pytest.raises(ConfigError, match="inside: expected an interface name without"):
        parse_text(f"snatgw {{\n inside {name}\n}}\n", "t.conf", [])


@pytest.mark.parametrize("name", ["a b", "lan/40", "eth\t1"])
def test_a_short_name_with_a_slash_or_a_space_is_told_why_not_its_length(name):
    """`snatgw adm --oif 'a b'` (or run --inside, explain --oif) was told "expected an interface
    name of 1..15 characters" of a 3-character name; the kernel's reason is what is wrong."""
    from snatgw.rules import RuleError, parse_oif

    with pytest.raises(RuleError, match="no device can be named so") as ei:
        parse_oif(name)
    assert "1..15 characters" not in str(ei.value)


SECRET = "root:$y$j9T$TopSecretHash0123:19700"  # not config text ($): described, never echoed
LINK = ("virtual_server fwmark 1 {\n snat_rule { from 198.18.40.0/24 gw 198.19.2.1 snat_ip 198.19.2.71 }\n}\n"
        "link isp1 {\n gw 198.19.2.1\n probe 203.0.113.10\n backup_gw 198.19.3.1\n {}\n}\n")


def _rule(words: str) -> str:
    return "virtual_server fwmark 1 {\n snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71 " + words + " }\n}\n"


@pytest.mark.parametrize("word", [SECRET, "x" * 300])
@pytest.mark.parametrize("text,line,field", [
    (_rule("on_exhausted {}"), 2, "on_exhausted"),
    (_rule("mapping {}"), 2, "mapping"),
    (_rule("filtering {}"), 2, "filtering"),
    (_rule("port_preserve {}"), 2, "port_preserve"),
    (_rule("max_sessions_per_host {}"), 2, "max_sessions_per_host"),
    (_rule("oif {}"), 2, "oif"),
    (LINK.replace("{}", "interval {}"), 8, "interval"),
    (LINK.replace("{}", "fall {}"), 8, "fall"),
    (LINK.replace("{}", "hold {}"), 8, "hold"),
    (LINK.replace("{}", "source 198.19.2.2 {}"), 8, "source"),
    ("snatgw {\n metrics_listen 127.0.0.1:{}\n}\n" + RULE, 2, "metrics_listen"),
    ("snatgw {\n metrics_listen {}:9469\n}\n" + RULE, 2, "metrics_listen"),
])  # fmt: skip
def test_no_value_error_echoes_a_word_that_is_not_config_text(text, line, field, word):
    """Every value's error describes a word that is not config text instead of quoting it, as
    docs/config.md says of them all: these quoted it whole (a 2 MB one went into the reload's
    answer, the log and every `status` after it), from on_exhausted to a link's numbers."""
    e = err(text.replace("{}", word))
    assert e.where == f"t.conf:{line}" and e.field == field, str(e)
    assert word not in str(e) and "TopSecret" not in str(e) and "x" * 65 not in str(e)
    assert "characters that is not config text (not shown)" in str(e)


@pytest.mark.parametrize("digits", ["\u00b2", "\u0661\u0662", "\uff11\uff12"])
@pytest.mark.parametrize("text,line,field", [
    (_rule("max_sessions_per_host {}"), 2, "max_sessions_per_host"),
    (LINK.replace("{}", "interval {}"), 8, "interval"),
    (LINK.replace("{}", "fall {}"), 8, "fall"),
    (LINK.replace("{}", "rise {}"), 8, "rise"),
    (LINK.replace("{}", "hold {}"), 8, "hold"),
    ("snatgw {\n metrics_listen 127.0.0.1:9{}\n}\n" + RULE, 2, "metrics_listen"),
])  # fmt: skip
def test_non_ascii_digits_of_a_rule_a_link_or_the_metrics_port_are_config_errors(text, line, field, digits):
    """As the snatgw { } settings' numbers (above): a rule's `max_sessions_per_host ²` was a
    traceback from `snatgw check`, and `١٢` there, a link's `fall ١٢` or `hold ١٢`, and
    `metrics_listen 127.0.0.1:9١٢` were taken as 12 and port 912."""
    e = err(text.replace("{}", digits))
    assert e.where == f"t.conf:{line}" and e.field == field, str(e)


def test_check_of_a_rules_host_limit_in_superscript_digits_is_an_error_not_a_traceback(tmp_path):
    conf = tmp_path / "sup.conf"
    conf.write_text(_rule("max_sessions_per_host 2\u00b2"), encoding="utf-8")
    p = subprocess.run([sys.executable, "-m", "snatgw.cli.main", "check", str(conf)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "sup.conf:2: max_sessions_per_host: expected an integer 0..4294967295" in p.stderr


def test_runs_help_says_what_the_fake_backend_is():
    """`run --backend {bpf,nft,fake}` offered fake as a datapath like the others; it is the
    tests' Python model and translates nothing on the machine."""
    import argparse

    from snatgw.daemon.main import register

    p = argparse.ArgumentParser()
    register(p)
    (backend,) = [a for a in p._actions if a.dest == "backend"]
    assert "fake: the Python model, for tests" in backend.help and "translated" in backend.help


@pytest.mark.parametrize("argv", [
    ["-L", SECRET],
    ["-K", "-f", "1", "-F", "198.18.40.0/24", "-U", "198.19.2.71", "x" * 300],
    ["-A", "-f", SECRET, "-s", "snat_sched"],
    ["-A", "-f", "1", "-s", SECRET],
    ["--" + "x" * 300],
])  # fmt: skip
def test_adm_never_echoes_an_argument_that_is_not_config_text(argv):
    """The daemon's `adm` op answers with parse_args' error: an extra argument, -f's or -s's
    value and an unknown long option were quoted whole (a line of /etc/shadow piped to
    `adm -R`, a 2 MB word sent to the socket); they are described as the config's are."""
    with pytest.raises(AdmUsageError) as ei:
        parse_args(argv)
    msg = str(ei.value)
    assert "TopSecret" not in msg and "x" * 65 not in msg and "that is not config text (not shown)" in msg
    with pytest.raises(AdmUsageError, match=r"^-f 2: only fwmark 1 is the SNAT service"):
        parse_args(["-A", "-f", "2", "-s", "snat_sched"])
    with pytest.raises(AdmUsageError, match=r"^unexpected argument 'extra'"):
        parse_args(["-L", "extra"])


@pytest.mark.parametrize("text,line,field", [
    ("snatgw }\n" + RULE, 1, "snatgw"),
    ("virtual_server fwmark 1 }\n snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71 }\n}\n", 1, "virtual_server"),
    (RULE + "link isp1 }\n", 4, "link"),
    ("virtual_server fwmark 1 {\n snat_rule }\n", 2, "snat_rule"),
])  # fmt: skip
def test_a_brace_where_the_block_should_open_is_named(text, line, field):
    """`link isp1 }` (a '{' typed as '}') said "got a word of 1 characters that is not config
    text (not shown)": a brace is config text."""
    e = err(text)
    assert e.where == f"t.conf:{line}" and e.field == field
    assert e.message == "expected '{' to open the block, got '}'"


@pytest.mark.parametrize("text,field,value", [
    ("snatgw {\n port_range 5000-\n}\n" + RULE, "port_range", "'5000-'"),
    ("snatgw {\n port_range -6000\n}\n" + RULE, "port_range", "'-6000'"),
    ("virtual_server fwmark 1 {\n snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71- }\n}\n", "snat_ip",
     "'198.19.2.71-'"),
    ("virtual_server fwmark 1 {\n snat_rule { from 198.18.40.0/24 snat_ip -198.19.2.71 }\n}\n", "snat_ip",
     "'-198.19.2.71'"),
])  # fmt: skip
def test_a_range_with_a_side_missing_is_named_whole(text, field, value):
    """`port_range 5000-` said "got a word of 0 characters that is not config text (not shown)",
    and `snat_ip 198.19.2.71-` "got ''": the value as written, and what is missing."""
    e = err(text)
    assert e.where == "t.conf:2" and e.field == field
    assert f"got {value}: " in e.message and "missing on one side of '-'" in e.message
    assert P.shown("") == "nothing"
