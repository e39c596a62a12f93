"""ipvsadm syntax (snatgw.config.adm): parsing, refusals, the rule table, save/restore, and the
listing formats of snatgw.cli.commands.adm.  Pure: no daemon, no root."""

from __future__ import annotations

import shlex
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snatgw.cli.commands import adm as admcli
from snatgw.config.adm import (AdmRefused, AdmTable, AdmUsageError, parse_args, parse_restore,
                               save_lines)
from snatgw.layout import Algo
from snatgw.rules import Pool, Rule, RuleSet

# the seed's ipvsadm lines, mapped onto the lab addresses (plan.md)
SEED = [
    "-A -f 1 -s snat_sched",
    "-K -f 1 -F 198.18.40.0/24 -W 198.19.2.1 --oif eth1 -U 198.19.2.100-198.19.2.110 -O random",
    "-K -f 1 -F 198.18.40.0/24 -W 198.19.3.1 --oif eth2 -U 198.19.3.100-198.19.3.110 -O sdh",
    "-K -f 1 -F 198.18.50.0/24 -W 198.19.2.1 -N 198.19.3.1 -U 198.19.3.100-198.19.3.110 -O sh",
    "-K -f 1 -F 198.18.0.0/16 -N 198.19.3.1 -U 198.19.3.100-198.19.3.110",
]


def cmd(line: str):
    return parse_args(shlex.split(line))


def table_of(lines) -> AdmTable:
    return AdmTable(service=False).apply_all([cmd(x) for x in lines])


def test_seed_add_line_parses_every_field():
    """The seed's -K line sets from, gw, oif, pool and algo; to defaults to 0.0.0.0/0."""
    c = cmd(SEED[1])
    assert c.op == "add" and c.fwmark == 1
    r = c.rule()
    assert r.src == IPv4Network("198.18.40.0/24") and r.dst == IPv4Network("0.0.0.0/0")
    assert r.gw == IPv4Address("198.19.2.1") and r.oif == "eth1" and r.new_gw is None
    assert str(r.pool) == "198.19.2.100-198.19.2.110" and r.algo == Algo.RANDOM


def test_long_options_and_clusters_mean_the_same():
    """--add-snat/--from/... and clustered short flags (-Lnc) parse like their short forms."""
    long = cmd("--add-snat --fwmark-service 1 --from 198.18.40.0/24 --gw 198.19.2.1 --oif=eth1 "
               "--snat-ip 198.19.2.71 --algo sh --new-gw 198.19.3.1 --to 203.0.113.0/24")
    short = cmd("-K -f 1 -F 198.18.40.0/24 -W 198.19.2.1 --oif eth1 -U 198.19.2.71 -O sh -N 198.19.3.1 "
                "-T 203.0.113.0/24")
    assert long.rule() == short.rule()
    lnc = cmd("-Lnc")
    assert lnc.op == "list" and lnc.numeric and lnc.conns


def test_default_algo_is_sdh_and_zero_gw_means_none():
    """Without -O the algo is sdh; -W/-N 0.0.0.0 (as -S writes them) mean 'not set'."""
    r = cmd("-K -f 1 -F 198.18.0.0/16 -W 0.0.0.0 -N 0.0.0.0 -U 198.19.3.71").rule()
    assert r.algo == Algo.SDH and r.gw is None and r.new_gw is None


@pytest.mark.parametrize("line, needle", [
    ("-K -f 1 -F 198.18.40.0/24", "-U"),
    ("-K -f 1 -U 198.19.2.71", "-F"),
    ("-K -F 198.18.40.0/24 -U 198.19.2.71", "-f 1"),
    ("-K -f 2 -F 198.18.40.0/24 -U 198.19.2.71", "fwmark 1"),
    ("-A -f 1 -s rr", "snat_sched"),
    ("-K -f 1 -F 198.18.40.1/24 -U 198.19.2.71", "did you mean 198.18.40.0/24"),
    ("-K -f 1 -F 198.18.40.0/33 -U 198.19.2.71", "0..32"),
    ("-K -f 1 -F 198.18.40.0/24 -U 198.19.2.73-198.19.2.71", "max ip smaller than min ip"),
    ("-K -f 1 -F 198.18.40.0/24 -U 198.19.2.71 -O rand", "should be one of [sh, sdh, random]"),
    ("-K -f 1 -F 198.18.40.0/24 -U 198.19.2.71 --oif averyveryverylongname", "1..15"),
    ("-K -f 1 -F 198.18.40.0/24 -U 198.19.2.71 -m", "only source-NATs"),
    ("-A -t 198.19.2.2:80 -s snat_sched", "only the SNAT service"),
    ("-K -L -f 1", "multiple commands"),
    ("-L --oif eth1", "illegal option --oif"),
    ("-q", "not recognized"),
    # the patched ipvsadm's FULLNAT local addresses: named, with the pool as snatgw's way
    ("-P -f 1 -z 198.19.2.71", "-P (the patched ipvsadm's FULLNAT local-address add)"),
    ("-Q -f 1 -z 198.19.2.71", "local-address delete"),
    ("-G", "-G (the patched ipvsadm's FULLNAT local-address listing) is ipvsadm's"),
    ("--get-laddr", "-U/--snat-ip"),
    ("-L -z 198.19.2.71", "-z (the patched ipvsadm's FULLNAT local-address option)"),
    ("", "no command"),
    ("-L extra", "unexpected argument"),
    # a command or a value given twice is refused, not the last one taken (as ipvsadm):
    # `-F A -F B` (a -T typed as -F) would add a rule for B alone, silently
    ("-K -K -f 1 -F 198.18.40.0/24 -U 198.19.2.71", "multiple commands"),
    ("-K --add-snat -f 1 -F 198.18.40.0/24 -U 198.19.2.71", "multiple commands"),
    ("-K -f 1 -F 198.18.40.0/24 -F 203.0.113.0/24 -U 198.19.2.71", "multiple -F/--from options"),
    ("-K -f 1 -F 198.18.40.0/24 --from 198.18.50.0/24 -U 198.19.2.71", "(-F and --from)"),
    ("-K -f 1 -F 198.18.40.0/24 -U 198.19.2.71 -U 198.19.3.71", "multiple -U/--snat-ip options"),
    ("-K -f 1 -F 198.18.40.0/24 -U 198.19.2.71 --oif eth1 --oif eth2", "multiple --oif options"),
    ("-k -f 1 -F 198.18.40.0/24 -W 198.19.2.1 -W 198.19.3.1 -U 198.19.2.71", "multiple -W/--gw"),
    ("-K -f 1 -f 1 -F 198.18.40.0/24 -U 198.19.2.71", "multiple -f/--fwmark-service"),
])  # fmt: skip
def test_bad_arguments_are_one_line_usage_errors_with_exit_2(line, needle):
    """Each malformed command raises AdmUsageError (exit 2) whose one-line text says what is wrong."""
    with pytest.raises(AdmUsageError) as ei:
        cmd(line)
    assert needle in str(ei.value) and "\n" not in str(ei.value)
    assert ei.value.exit_code == 2


@pytest.mark.parametrize("line, what, instead", [
    ("-a -f 1 -r 10.0.0.1 -m", "-a (add a real server)", "a rule is added with -K"),
    ("-e -f 1 -r 10.0.0.1 -w 2", "-e (edit a real server)", "edited with -k"),
    ("-d -f 1 -r 10.0.0.1", "-d (delete a real server)", "deleted with -H"),
    ("--add-server -f 1 --real-server 10.0.0.1", "--add-server (add a real server)", "-K"),
    ("--set 900 120 300", "--set (IPVS's connection timeouts)", "timeout NAME SECONDS"),
    ("-L --timeout", "--timeout (list IPVS's timeouts)", "snatgw check CONFIG"),
    ("--start-daemon master --mcast-interface eth0", "--start-daemon (IPVS's connection sync daemon)", "sync_peer"),
    ("-L --daemon", "--daemon (list the sync daemon)", "conntrackd"),
    ("-L -n --thresholds", "--thresholds", "max_sessions_per_host"),
    ("-L -n --persistent-conn", "--persistent-conn", "algo sh"),
    ("-L -n --sort", "--sort", "precedence order"),
    ("-A -f 1 -s snat_sched -o", "-o (one-packet scheduling)", "every new flow"),
    ("-A -f 1 -s snat_sched -M 255.255.255.0", "-M (persistence netmask)", "no persistent services"),
    ("-v", "-v (print the version)", "snatgw --version"),
    ("-A -6 -f 1 -s snat_sched", "-6 (an IPv6 fwmark service)", "IPv4 only"),
    ("-A --sctp-service 192.0.2.1:80 -s rr", "--sctp-service (an SCTP virtual service)", "only the SNAT service"),
    ("--start-daemon master --mcast-group 224.0.0.81", "--start-daemon", "sync_peer"),
    ("-e -f 1 -r 10.0.0.1 --tun-type gue", "-e (edit a real server)", "-k"),
    ("-L -n --tun-info", "--tun-info (the listing's tunnel columns)", "only source-NATs"),
    # ipvsadm(8)'s -x/-y are a real server's thresholds, with a value: `-x 100` was read as
    # --exact (snatgw's -x then) and a stray '100'
    ("-L -n -x 100", "-x (--u-threshold, a real server's upper connection threshold)",
     "no connection thresholds"),
    ("-L -x", "-x (--u-threshold", "exact counters are --exact (-X, capital, as in ipvsadm)"),
    ("-L -n -y 10", "-y (--l-threshold, a real server's lower connection threshold)", "no real servers"),
    ("-L --u-threshold 100", "--u-threshold (a real server's upper connection threshold)", "no real servers"),
    ("-L --l-threshold=10", "--l-threshold (a real server's lower connection threshold)", "no real servers"),
    ("-A -f 1 -s snat_sched --sched-flags sh-port", "--sched-flags (stock ipvsadm's scheduler flags",
     "snat_sched has no flags"),
    ("-A -f 1 -s snat_sched --synproxy enable", "--synproxy (the patched ipvsadm's SYN proxy switch)",
     "never uses the SYN proxy"),
])  # fmt: skip
def test_ipvsadm_options_snatgw_cannot_do_are_named_with_what_to_do(line, what, instead):
    """An option ipvsadm accepts and snatgw cannot do is said to be ipvsadm's, with what it is
    and snatgw's way (exit 2, one line), not 'option -a not recognized' as a typo would be."""
    with pytest.raises(AdmUsageError) as ei:
        cmd(line)
    msg = str(ei.value)
    assert msg.startswith(what) and "is ipvsadm's, not snatgw's: " in msg and instead in msg, msg
    assert "not recognized" not in msg and "\n" not in msg and ei.value.exit_code == 2


def test_exact_is_capital_x_as_in_ipvsadm():
    """--exact expands the counters, and so does -X (ipvsadm's option table gives --exact 'X',
    stock 1.31 and patched alike); -x is never taken for it: ipvsadm's -x is --u-threshold N, so
    a script's `-x 100` must not list with exact counters (it did, had the 100 not stood alone)
    nor fail as a stray word."""
    assert cmd("-L -n --stats --exact").exact and cmd("-L -n --stats -X").exact and cmd("-LnX").exact
    assert not cmd("-L -n --stats").exact
    for line in ("-L -n --stats -x", "-Lnx", "-L -n -x 100"):
        with pytest.raises(AdmUsageError, match=r"^-x \(--u-threshold") as ei:
            cmd(line)
        assert "unexpected argument" not in str(ei.value) and ei.value.exit_code == 2


@pytest.mark.parametrize("line, needle", [
    # a value ipvsadm would read after a flag that snatgw (and the patched ipvsadm) takes bare
    ("-A -f 1 -s snat_sched -b sh-fallback", "-b is the patched ipvsadm's --fullnat and takes no value; "
     "stock ipvsadm's -b is --sched-flags FLAGS"),
    ("-L -n -j enable", "-j is snatgw's --json and takes no value; the patched ipvsadm's -j is --synproxy"),
    # ipvsadm's -p takes its timeout optionally: a bare -p is persistence, refused as -p 300 is
    ("-A -f 1 -s snat_sched -p", "-p: only the SNAT service -f 1 -s snat_sched is supported"),
    ("-A -f 1 -s snat_sched -p 300", "-p: only the SNAT service -f 1 -s snat_sched is supported"),
])  # fmt: skip
def test_ipvsadm_values_of_other_meanings_are_explained(line, needle):
    with pytest.raises(AdmUsageError) as ei:
        cmd(line)
    assert needle in str(ei.value) and "\n" not in str(ei.value) and ei.value.exit_code == 2


def test_a_stray_word_after_any_other_flag_gets_no_such_hint():
    with pytest.raises(AdmUsageError) as ei:
        cmd("-L -n sh-fallback -b")
    assert str(ei.value) == "unexpected argument 'sh-fallback' (see snatgw adm --help)"


def test_completion_offers_only_options_adm_takes():
    """Bash completion's adm words are options parse_args declares (it offered -x for --exact)."""
    from snatgw.cli.completion import ADM_OPTS
    from snatgw.config import adm

    for o in ADM_OPTS.split():
        if o.startswith("--"):
            assert o[2:] in adm._LONG or o[2:] + "=" in adm._LONG, o
        else:
            assert len(o) == 2 and o[1] in adm._SHORT.replace(":", ""), o
    assert "-x" not in ADM_OPTS.split()


def test_restore_reads_a_windows_saved_file():
    """`-S` output edited in a Windows editor (a byte order mark, CR LF) restores as the plain
    one: the mark was read as part of '-A', 'line 1: unexpected argument'."""
    from snatgw.config.adm import parse_restore

    plain = ("-A -f 1 -s snat_sched\n-K -f 1 -F 198.18.40.0/24 -T 0.0.0.0/0 -W 198.19.2.1 "
             "-U 198.19.2.71-198.19.2.73 -O random -N 0.0.0.0 --oif eth1\n")
    win = "\ufeff" + plain.replace("\n", "\r\n")
    assert [(c.op, c.identity, c.pool) for c in parse_restore(win)] == \
        [(c.op, c.identity, c.pool) for c in parse_restore(plain)]  # fmt: skip
    assert len(parse_restore(win)) == 2


def test_a_flag_without_a_value_may_be_given_twice():
    """Only commands and value options given twice are refused (above): `-n -n` is harmless."""
    assert cmd("-K -f 1 -F 198.18.40.0/24 -T 203.0.113.0/24 -U 198.19.2.71 -n -n").src.prefixlen == 24


def test_adding_an_existing_identity_is_refused_with_exists():
    """-K of an identity (from, to, gw, oif) that exists fails EEXIST and changes nothing."""
    t = table_of(SEED[:2])
    dup = cmd("-K -f 1 -F 198.18.40.0/24 -W 198.19.2.1 --oif eth1 -U 198.19.3.71 -O sh")
    with pytest.raises(AdmRefused) as ei:
        t.apply(dup)
    assert ei.value.code == "EEXIST" and "exists" in str(ei.value)
    assert len(t.rules) == 1


def test_edit_and_delete_of_a_missing_rule_are_enoent():
    """-k and -H of an identity that is not there fail ENOENT."""
    t = table_of(SEED[:2])
    for line in ("-k -f 1 -F 198.18.41.0/24 -U 198.19.2.71", "-H -f 1 -F 198.18.40.0/24 --oif eth1"):
        with pytest.raises(AdmRefused) as ei:
            t.apply(cmd(line))
        assert ei.value.code == "ENOENT"


def test_edit_replaces_attributes_and_keeps_definition_order():
    """The seed's failover: -k the eth1 rule to new_gw and the ISP2 pool; it stays where it was."""
    t = table_of(SEED)
    t2 = t.apply(cmd("-k -f 1 -F 198.18.40.0/24 -W 198.19.2.1 --oif eth1 -N 198.19.3.1 "
                     "-U 198.19.3.71-198.19.3.73 -O sdh"))
    assert [r.identity for r in t2.rules] == [r.identity for r in t.rules]
    assert t2.rules[0].new_gw == IPv4Address("198.19.3.1") and str(t2.rules[0].pool) == "198.19.3.71-198.19.3.73"


def test_delete_ignores_pool_algo_and_new_gw():
    """-H matches on identity only; -U/-O/-N on the line are accepted and ignored."""
    t = table_of(SEED)
    t2 = t.apply(cmd("-H -f 1 -F 198.18.0.0/16 -U 1.2.3.4 -O sh -N 198.19.2.1"))
    assert len(t2.rules) == len(t.rules) - 1
    assert all(r.src != IPv4Network("198.18.0.0/16") for r in t2.rules)


def test_rules_need_the_service_and_clear_removes_it():
    """Without -A there is no service (ESRCH); -C drops the service and every rule."""
    with pytest.raises(AdmRefused) as ei:
        AdmTable(service=False).apply(cmd(SEED[1]))
    assert ei.value.code == "ESRCH"
    t = table_of(SEED).apply(cmd("-C"))
    assert not t.service and t.rules == () and len(t.ruleset()) == 0
    with pytest.raises(AdmRefused):
        table_of(SEED).apply(cmd("-A -f 1 -s snat_sched"))


def test_a_batch_is_all_or_nothing():
    """A batch whose third command is refused leaves the table exactly as it was."""
    t = table_of(SEED[:2])
    batch = [cmd(SEED[2]), cmd(SEED[3]), cmd(SEED[1])]  # last one duplicates
    with pytest.raises(AdmRefused) as ei:
        t.apply_all(batch)
    assert "command 3" in str(ei.value)
    assert len(t.rules) == 1


def test_save_writes_the_service_then_rules_in_definition_order():
    """-S: '-A -f 1 -s snat_sched', then -K lines in the order the rules were added."""
    lines = save_lines(table_of(SEED))
    assert lines[0] == "-A -f 1 -s snat_sched"
    assert lines[1] == ("-K -f 1 -F 198.18.40.0/24 -T 0.0.0.0/0 -W 198.19.2.1 -U 198.19.2.100-198.19.2.110 "
                        "-O random -N 0.0.0.0 --oif eth1")
    assert lines[4].startswith("-K -f 1 -F 198.18.0.0/16 ")
    assert save_lines(AdmTable(service=False)) == []


def test_restore_skips_comments_and_names_the_bad_line():
    """-R input: blank and # lines are skipped; an error names its line; listing is not restorable."""
    assert len(parse_restore("# saved\n\n" + "\n".join(SEED))) == 5
    with pytest.raises(AdmUsageError, match="line 2"):
        parse_restore("-A -f 1 -s snat_sched\n-K -f 1 -F 10.0.0.1/8 -U 1.1.1.1\n")
    with pytest.raises(AdmUsageError, match="cannot be restored"):
        parse_restore("-L -n\n")


def test_a_restore_longer_than_one_batch_names_its_line():
    """The daemon refused such a batch as "adm: N commands", printed "snatgw adm: adm: ..."
    after the whole input was read and sent; now the line that is one too many is named."""
    from snatgw.config.adm import MAX_COMMANDS

    line = "-K -f 1 -F 198.18.0.0/16 -U 198.19.2.1\n"
    assert len(parse_restore(line * MAX_COMMANDS)) == MAX_COMMANDS
    with pytest.raises(AdmUsageError, match=f"line {MAX_COMMANDS + 2}: command {MAX_COMMANDS + 1}; a restore"):
        parse_restore("# saved\n" + line * (MAX_COMMANDS + 1))


# ---------------------------------------------------------------- save -> restore round trip

_octet = st.integers(0, 255)


@st.composite
def rules(draw):
    plen = draw(st.integers(0, 32))
    src = IPv4Network((draw(st.integers(0, 2**32 - 1)), plen), strict=False)
    dlen = draw(st.integers(0, 32))
    dst = IPv4Network((draw(st.integers(0, 2**32 - 1)), dlen), strict=False)
    addr = st.integers(1, 2**32 - 1).map(IPv4Address)
    first = draw(st.integers(1, 2**32 - 300))
    last = first + draw(st.integers(0, 255))
    return Rule(src=src, dst=dst, gw=draw(st.none() | addr), oif=draw(st.none() | st.sampled_from(["eth1", "eth2", "ppp0"])),
                new_gw=draw(st.none() | addr), pool=Pool(IPv4Address(first), IPv4Address(last)),
                algo=draw(st.sampled_from(list(Algo))))


@settings(max_examples=150, deadline=None)
@given(st.lists(rules(), max_size=8, unique_by=lambda r: r.identity))
def test_save_then_restore_gives_the_same_rules_in_the_same_order(defined):
    """-S output fed to -R (on a cleared table) rebuilds the same RuleSet, in the same definition order."""
    original = AdmTable(True, tuple(defined))
    restored = AdmTable(service=False).apply_all(parse_restore("\n".join(save_lines(original))))
    assert restored.rules == original.rules
    assert restored.ruleset() == RuleSet(defined)
    assert restored.ruleset().defined == RuleSet(defined).defined


# ---------------------------------------------------------------- listing formats


def _rules_resp(table: AdmTable) -> list[dict]:
    from snatgw.daemon.service import rule_info

    return [rule_info(i, r) for i, r in enumerate(table.ruleset(), 1)]


def test_list_uses_the_original_column_widths_and_precedence_order():
    """-L -n: title and rows at widths 20,20,17,16,32,8,17,10,10 after '  -> ', most specific rule first."""
    t = table_of(SEED)
    sessions = [{"proto": "tcp", "state": "ESTABLISHED", "rule_id": t.rules[0].rule_id},
                {"proto": "udp", "state": "UDP", "rule_id": t.rules[0].rule_id}]
    out = admcli.format_list(_rules_resp(t), True, sessions, 262144).splitlines()
    assert out[0] == "IP Virtual Server version 1.2.2 (size=262144)"
    assert out[1] == "Prot LocalAddress:Port Scheduler Flags"
    assert out[2] == ("  -> SourceAddr          DestAddr            GW               Oif             "
                      "SnatIp                          Algo    NewGW            ActConn   InActConn ")
    assert out[3] == "FWM  1 snat_sched"
    assert out[4] == ("  -> 198.18.40.0/24      0.0.0.0/0           198.19.2.1       eth1            "
                      "198.19.2.100-198.19.2.110       random  0.0.0.0          1         1         ")
    # precedence: /24 rules (both oif+gw, then gw only) before the /16 catch-all
    assert [line.split()[1] for line in out[4:]] == ["198.18.40.0/24", "198.18.40.0/24", "198.18.50.0/24",
                                                      "198.18.0.0/16"]
    assert out[-1].split()[3:6] == ["0.0.0.0", "198.19.3.100-198.19.3.110", "sdh"]  # empty oif prints blank


def test_list_of_a_single_address_pool_prints_one_address():
    """A pool of one address lists as 'a', not 'a-a'."""
    t = table_of(["-A -f 1 -s snat_sched", "-K -f 1 -F 198.18.0.0/16 -U 198.19.2.71"])
    row = admcli.format_list(_rules_resp(t), True, [], 1).splitlines()[4]
    assert row[5 + 20 + 20 + 17 + 16:][:32].rstrip() == "198.19.2.71"


def test_connection_listing_follows_the_original_format():
    """-L -n -c: '%-3s %-6s %-11s %-30s x4' with expire as mm:ss; local is the SNAT address:port."""
    s = {"proto": "tcp", "inside": "198.18.40.10:40000", "remote": "203.0.113.10:80",
         "nat": "198.19.2.72:21541", "state": "ESTABLISHED", "idle": 1.0, "expires": 89.0, "rule_id": 1}
    out = admcli.format_conns([s]).splitlines()
    assert out[0] == "IPVS connection entries"
    assert out[1].startswith("pro expire state       source                         virtual ")
    assert out[2] == ("TCP 01:29  ESTABLISHED " + "198.18.40.10:40000".ljust(30) + " " + "203.0.113.10:80".ljust(30)
                      + " " + "198.19.2.72:21541".ljust(30) + " " + "203.0.113.10:80".ljust(30))


def test_stats_rows_name_each_rule_and_large_numbers_shorten_unless_exact():
    """--stats lists per-rule counters with the rule text; 9+ digit numbers become K unless -x."""
    t = table_of(SEED[:2])
    rid = t.rules[0].rule_id
    stats = {"rules": {str(rid): {"packets": 123456789, "bytes": 5, "sessions": 2}}}
    out = admcli.format_stats(_rules_resp(t), stats).splitlines()
    assert "from 198.18.40.0/24 gw 198.19.2.1 oif eth1" in out[3] and "123456K" in out[3]
    assert "123456789" in admcli.format_stats(_rules_resp(t), stats, exact=True).splitlines()[3]


def test_rate_shows_the_port_searches_when_the_backend_counts_them():
    """--rate: per-rule rates, then (bpf) the port searches per second and their mean tries
    over the interval; nothing of the kind where the backend has no allocator counters (nft)."""
    t = table_of(SEED[:2])
    rate = {"rules": {}, "allocator": {"searches_per_sec": 812.25, "tries_per_sec": 1533.0,
                                       "tries_per_search": 1.887}}  # fmt: skip
    out = admcli.format_stats(_rules_resp(t), {}, rate=rate).splitlines()
    assert out[-1] == "port search: 812.2 searches/s, 1.89 tries per search"
    idle = dict(rate, allocator={"searches_per_sec": 0.0, "tries_per_sec": 0.0, "tries_per_search": None})
    assert admcli.format_stats(_rules_resp(t), {}, rate=idle).splitlines()[-1].endswith("- tries per search")
    assert "port search" not in admcli.format_stats(_rules_resp(t), {}, rate={"rules": {}})


# ---------------------------------------------------------------- -R as a restore (replace)


def test_restore_batch_replaces_the_rules_and_tolerates_the_existing_service():
    """-R: '-A' for an enabled service is a no-op and the saved rules replace the current ones."""
    current = table_of(SEED[:2] + [SEED[4]])
    restored = current.apply_all(parse_restore("\n".join([SEED[0], SEED[3], SEED[2]])), restore=True)
    assert restored.service
    assert [r.src for r in restored.rules] == [IPv4Network("198.18.50.0/24"), IPv4Network("198.18.40.0/24")]
    assert restored.rules[1].gw == IPv4Address("198.19.3.1")
    with pytest.raises(AdmRefused):  # outside -R, -A of an existing service is still EEXIST
        current.apply_all([cmd(SEED[0])])


def test_restore_batch_is_all_or_nothing():
    """A -R batch with a refused line (a duplicate -K) leaves the current rules untouched."""
    current = table_of(SEED)
    with pytest.raises(AdmRefused, match="command 3"):
        current.apply_all([cmd(SEED[0]), cmd(SEED[1]), cmd(SEED[1])], restore=True)
    assert current.rules == table_of(SEED).rules


def test_restore_without_the_service_line_needs_an_enabled_service():
    """-R of bare -K lines works on an enabled service and is refused (ESRCH) on a disabled one."""
    assert len(table_of(SEED).apply_all([cmd(SEED[1])], restore=True).rules) == 1
    with pytest.raises(AdmRefused) as ei:
        AdmTable(service=False).apply_all([cmd(SEED[1])], restore=True)
    assert ei.value.code == "ESRCH"




def _adm(running, *argv: str, stdin: str = "") -> tuple[int, str]:
    import io

    out = io.StringIO()
    rc = admcli.main([*argv, "--socket", running.sock], stdin=io.StringIO(stdin), stdout=out)
    return rc, out.getvalue()


def test_save_then_restore_on_the_daemon_restores_the_rules_without_clear(running):
    """-S, then rules changed, then -R of the saved text (no -C): the same rules in the same order."""
    assert _adm(running, "-K", "-f", "1", "-F", "198.18.50.0/24", "-N", "198.19.3.1",
                "-U", "198.19.3.71", "-O", "sh")[0] == 0
    rc, saved = _adm(running, "-S", "-n")
    assert rc == 0 and saved.startswith("-A -f 1 -s snat_sched\n") and saved.count("-K ") == 4
    assert _adm(running, "-H", "-f", "1", "-F", "198.18.0.0/16")[0] == 0
    assert _adm(running, "-K", "-f", "1", "-F", "198.18.60.0/24", "-U", "198.19.2.71")[0] == 0
    assert _adm(running, "-R", stdin=saved)[0] == 0
    assert _adm(running, "-S", "-n") == (0, saved)
    assert len(running.backend.config.rules) == 4
    assert _adm(running, "-R", stdin=saved)[0] == 0  # restoring twice is the same state
    assert _adm(running, "-S", "-n") == (0, saved)


def test_refused_restore_on_the_daemon_keeps_the_running_rules(running, capsys):
    """A -R whose lines clash (a -K twice) exits non-zero and the daemon keeps its rules."""
    rc, saved = _adm(running, "-S")
    dup = saved.splitlines()[1]
    rc, _ = _adm(running, "-R", stdin=f"-A -f 1 -s snat_sched\n{dup}\n{dup}\n")
    assert rc != 0 and "File exists" in capsys.readouterr().err
    assert _adm(running, "-S") == (0, saved)


@pytest.mark.parametrize("argv", [["-L", "-n"], ["-S", "-n"], ["-L", "-n", "--stats"], ["-h"]])
def test_closed_stdout_pipe_is_not_a_traceback(running, argv):
    """`snatgw adm -L -n | true`: the reader is gone before the write; exit 0, nothing on stderr."""
    import os
    import subprocess
    import sys

    r, w = os.pipe()
    os.close(r)  # the reader closes before adm writes: the write gets EPIPE every time
    try:
        p = subprocess.run([sys.executable, "-m", "snatgw.cli.main", "adm", *argv, "--socket", running.sock],
                           stdout=w, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(w)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr and p.stderr == ""


def test_a_batch_costs_each_command_one_lookup_not_a_scan(monkeypatch):
    """`adm -R` of the `-S` of a big table: each command scanned the rules for its identity and
    copied the table (2,000 rules: 10 s, 8,000: nearly 3 minutes under the service lock, the
    client gone after its 30 s); now a command looks its rule up once.  Counted, not timed:
    1,000 adds, an edit and a delete ask a command's identity a few times each, not per rule."""
    from snatgw.config import adm as A

    calls = [0]
    orig = A.AdmCommand.identity.fget

    def counted(self):
        calls[0] += 1
        return orig(self)

    monkeypatch.setattr(A.AdmCommand, "identity", property(counted))
    n = 1000
    cmds = [A.parse_args(["-A", "-f", "1", "-s", "snat_sched"])]
    cmds += [A.parse_args(["-K", "-f", "1", "-F", f"10.{i // 256}.{i % 256}.0/24", "-U", "198.19.2.71"])
             for i in range(n)]
    cmds += [A.parse_args(["-k", "-f", "1", "-F", "10.0.5.0/24", "-U", "198.19.2.72"]),
             A.parse_args(["-H", "-f", "1", "-F", "10.0.7.0/24"])]
    t = A.AdmTable(False, ()).apply_all(cmds, restore=True)
    assert len(t.rules) == n - 1 and calls[0] < 5 * len(cmds)
    assert str(t.rules[5].src) == "10.0.5.0/24" and str(t.rules[5].pool.short()) == "198.19.2.72"
    assert [str(r.src) for r in t.rules[6:8]] == ["10.0.6.0/24", "10.0.8.0/24"]
