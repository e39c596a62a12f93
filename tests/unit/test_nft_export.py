"""`snatgw export` (nft text/JSON, iptables) and the nft backend's pure parts (conntrack lines),
no root."""

from __future__ import annotations

import json

from snatgw.cli.main import main
from snatgw.config.parse import parse_text
from snatgw.datapath.nft.backend import parse_conntrack
from snatgw.datapath.nft.iptables import render_iptables

from test_nft_render import FAILOVER, REF  # same directory (pytest prepend import mode)

CT = """\
ipv4     2 tcp      6 7430 ESTABLISHED src=198.18.40.10 dst=203.0.113.10 sport=40000 dport=7007 packets=3 bytes=180 src=203.0.113.10 dst=198.19.2.72 sport=7007 dport=40000 packets=2 bytes=120 [ASSURED] mark=1397162342 zone=0 use=2
ipv4     2 udp      17 25 src=198.18.50.10 dst=198.51.100.10 sport=5353 dport=7007 [UNREPLIED] src=198.51.100.10 dst=198.19.2.71 sport=7007 dport=5353 mark=0 zone=0 use=2
ipv4     2 icmp     1 29 src=198.18.40.11 dst=198.51.100.10 type=8 code=0 id=4242 src=198.51.100.10 dst=198.19.3.71 type=0 code=0 id=4242 mark=1397161995 use=1
ipv6     10 udp      17 20 src=2001:db8::1 dst=2001:db8::2 sport=1 dport=2 src=2001:db8::2 dst=2001:db8::1 sport=2 dport=1 mark=0 use=1
"""


def _write(tmp_path, text, name="c.conf"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_conntrack_lines_give_both_tuples_state_mark_and_counters():
    """/proc/net/nf_conntrack lines parse into original and reply tuples, state, mark, acct."""
    tcp, udp, icmp = parse_conntrack(CT)
    assert (tcp["src"], tcp["sport"], tcp["rdst"], tcp["rdport"]) == ("198.18.40.10", "40000", "198.19.2.72", "40000")
    assert (tcp["state"], tcp["timeout"], tcp["mark"], tcp["assured"]) == ("ESTABLISHED", 7430, 1397162342, True)
    assert (tcp["packets"], tcp["rbytes"]) == ("3", "120")
    assert udp["state"] is None and udp["mark"] == 0 and not udp["assured"]
    assert (icmp["sport"], icmp["rdst"], icmp["rdport"]) == ("4242", "198.19.3.71", "4242")


def test_export_nft_prints_table_notes_and_routing(tmp_path, capsys):
    """--format nft: loadable text (flush + table), algo/port notes, ip rule commands as comments."""
    assert main(["export", _write(tmp_path, FAILOVER), "--format", "nft"]) == 0
    out = capsys.readouterr().out
    assert "flush table ip snatgw\ntable ip snatgw {" in out
    assert "# note: sh -> `snat to A-B persistent`" in out
    assert "#   ip rule add pref" in out and "fwmark 0x" in out
    assert all(ln.startswith(("#", "table", "flush", "\t", "}")) or not ln for ln in out.splitlines())


def test_export_nft_json_is_one_batch(tmp_path, capsys):
    """--format nft-json: one batch for `nft -j -f -`; what nft 1.0.6 makes of it alone (the ct
    timeout policies dropped, the sets not dynamic, so a second load fails) is said on stderr,
    with the text format as the one that loads as is: it was silent, and the table it loaded
    ran the kernel's timeouts instead of the config's."""
    assert main(["export", _write(tmp_path, REF), "--format", "nft-json"]) == 0
    cap = capsys.readouterr()
    cmds = json.loads(cap.out)["nftables"]
    assert "flush" in cmds[1]
    assert "ct timeout policies dropped" in cap.err and "`snatgw export --format nft` loads as is" in cap.err


def test_export_iptables_maps_algos_and_says_what_is_lost(tmp_path, capsys):
    """--format iptables: SNAT with --persistent/--random per algo, gw dropped with a note."""
    assert main(["export", _write(tmp_path, REF), "--format", "iptables"]) == 0
    out = capsys.readouterr().out
    assert "-j SNAT --to-source 198.19.2.71-198.19.2.73:5000-65535 --persistent" in out
    assert "-j SNAT --to-source 198.19.3.71-198.19.3.73 --random" in out
    assert "iptables cannot match the next hop" in out
    assert out.count("COMMIT") == 3


def test_iptables_guard_drops_invalid_from_rule_sources():
    """Invalid (no-conntrack) packets from a rule's source are dropped, never leave untranslated."""
    cfg = parse_text(REF)
    text, _ = render_iptables(cfg.rules, cfg.settings)
    assert "-A SNATGW_FWD -m conntrack --ctstate INVALID -j SNATGW_GUARD" in text
    assert '-A SNATGW_GUARD -s 198.18.0.0/16 -m comment --comment "snatgw 9b5ea668" -j DROP' in text


def test_export_of_a_bad_config_exits_2(tmp_path, capsys):
    """An invalid config prints its file:line error and exits 2, printing no rules."""
    assert main(["export", _write(tmp_path, "virtual_server fwmark 1 {\n snat_rule { from 1.2.3.4/8 snat_ip 198.19.2.71 }\n}\n")]) == 2
    cap = capsys.readouterr()
    assert "c.conf:2" in cap.err and "table" not in cap.out


def test_export_timeout_note_says_what_the_table_sets_and_what_it_cannot(tmp_path, capsys):
    """The note matches the timeout objects printed below it (every TCP state conntrack names
    as snatgw does, and UDP) and says the ICMP timeout is the namespace's sysctl, which the
    backend sets and loading the text does not.  It said ICMP and the TCP states other than
    established kept the kernel's, beside a policy that sets syn_sent, fin_wait, time_wait..."""
    conf = ("snatgw {\n timeout tcp_time_wait 30\n}\n"
            "virtual_server fwmark 1 {\n snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71 }\n}\n")
    assert main(["export", _write(tmp_path, conf), "--format", "nft"]) == 0
    out = capsys.readouterr().out
    (note,) = [ln for ln in out.splitlines() if ln.startswith("# note: timeouts:")]
    assert "time_wait: 30" in out and "time_wait" in note and "keep the kernel's (net" not in note
    assert "nf_conntrack_icmp_timeout" in note and "not" in note.split("nf_conntrack_icmp_timeout")[1]
