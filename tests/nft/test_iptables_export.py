"""`snatgw export --format iptables` fed to the real iptables-restore (root, mark nft), in a
namespace the test makes (never the host's tables): the export had only been read by eye and by
string tests.  Debian 12's iptables is the nft flavour (iptables-nft); scripts/setup.sh installs it.

Each exported rule must come back from iptables-save as it was written: same chain, same place,
same matches and target (iptables-save spells some of them its own way: `--set-mark M` as
`--set-xmark M/0xffffffff`, `! --syn` as `! --tcp-flags FIN,SYN,RST,ACK SYN`, and it orders the
matches itself; `canon` undoes exactly those)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from ipaddress import IPv4Address, IPv4Network

import pytest

from snatgw.cli.main import main
from snatgw.config.schema import Settings
from snatgw.datapath.nft.iptables import render_iptables
from snatgw.layout import Algo
from snatgw.rules import Pool, Rule, RuleSet

pytestmark = [pytest.mark.nft, pytest.mark.root]

#: what the export covers: one inside device (so `-i`), unmatched drop, a port range, to, oif,
#: gw with and without oif, new_gw (two, with rules between), every algo, one-address pools,
#: a rule from 0.0.0.0/0
CONFIG = """\
snatgw {
    inside lan40
    outside eth1 eth2
    port_range 20000-29999
    unmatched drop
}
virtual_server fwmark 1 {
  snat_rule { from 198.18.40.0/24  to 203.0.113.0/24  oif eth2  snat_ip 198.19.3.71  algo sh }
  snat_rule { from 198.18.40.5/32  gw 198.19.2.1  snat_ip 198.19.2.71-198.19.2.72  algo random }
  snat_rule { from 198.18.41.0/24  to 198.51.100.0/24  new_gw 198.19.3.1  snat_ip 198.19.3.72  algo sdh }
  snat_rule { from 198.18.40.0/24  gw 198.19.3.1  oif eth2  snat_ip 198.19.3.71-198.19.3.73  algo random }
  snat_rule { from 198.18.42.0/24  snat_ip 198.19.2.73 }
  snat_rule { from 198.18.0.0/16   new_gw 198.19.2.1  snat_ip 198.19.2.71-198.19.2.73  algo sh }
  snat_rule { from 0.0.0.0/0       oif eth1  snat_ip 198.19.2.73 }
}
"""

#: options without a value (the rest take one; --tcp-flags takes two)
_BARE = {"--persistent", "--random", "--random-fully", "--restore-mark", "--save-mark", "--syn"}


def canon(line: str) -> tuple[str, tuple]:
    """An `-A CHAIN ...` line -> (chain, its options as a set), in the export's spelling."""
    words = shlex.split(line)
    assert words[0] == "-A", line
    chain, words = words[1], words[2:]
    opts, neg, i = [], "", 0
    while i < len(words):
        w = words[i]
        if w == "!":
            neg, i = "!", i + 1
            continue
        if w == "-m":  # a match module: named by its options
            i += 2
            continue
        n = 0 if w in _BARE else 2 if w == "--tcp-flags" else 1
        opts.append((neg + w, " ".join(words[i + 1 : i + 1 + n])))
        neg, i = "", i + 1 + n
    out = set()
    for o, v in opts:
        if (o, v) in (("--nfmask", "0xffffffff"), ("--ctmask", "0xffffffff"), ("-s", "0.0.0.0/0"),
                      ("-d", "0.0.0.0/0")):  # fmt: skip
            continue  # the defaults, which iptables-save writes out or leaves out
        if (o, v) == ("!--tcp-flags", "FIN,SYN,RST,ACK SYN"):
            o, v = "!--syn", ""
        if o == "--set-xmark" and v.endswith("/0xffffffff") and ("-j", "MARK") in opts:
            o, v = "--set-mark", v.removesuffix("/0xffffffff")
        out.add((o, v))
    return chain, tuple(sorted(out))


def rules_by_chain(text: str, table: str) -> dict[str, list[tuple]]:
    """`-A` lines of one table of iptables-restore/-save text, canonical, in order, by chain."""
    out: dict[str, list[tuple]] = {}
    on = False
    for ln in text.splitlines():
        if ln.startswith("*"):
            on = ln == f"*{table}"
        elif on and ln.startswith("-A "):
            chain, opts = canon(ln)
            out.setdefault(chain, []).append(opts)
    return out


def _tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: run scripts/setup.sh (it installs Debian's iptables)")
    return found


def _run(ns: str, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], input=stdin, text=True, capture_output=True,
                          timeout=60)  # fmt: skip


NS_TAG = "ipt"  # empty_netns's names: sgipt<pid><random>


@pytest.fixture
def ns(empty_netns):
    return empty_netns


def _export(tmp_path, capsys, text: str = CONFIG) -> str:
    path = tmp_path / "ipt.conf"
    path.write_text(text)
    assert main(["export", str(path), "--format", "iptables"]) == 0
    return capsys.readouterr().out


def test_the_export_of_a_full_config_passes_iptables_restore_test(tmp_path, capsys, ns):
    """iptables-restore --test (parses and checks every line against the kernel, commits
    nothing) takes the export whole, without a warning."""
    text = _export(tmp_path, capsys)
    p = _run(ns, _tool("iptables-restore"), "--test", stdin=text)
    assert p.returncode == 0 and not p.stderr, p.stderr
    assert _run(ns, _tool("iptables-save")).stdout.count("-A ") == 0  # --test loaded nothing


def test_the_loaded_export_reads_back_rule_for_rule(tmp_path, capsys, ns):
    """Loaded into an empty namespace, iptables-save gives back every exported rule, in its chain
    and place, with its matches and target; the built-in chains jump to snatgw's once."""
    text = _export(tmp_path, capsys)
    p = _run(ns, _tool("iptables-restore"), "--noflush", stdin=text)
    assert p.returncode == 0 and not p.stderr, p.stderr
    saved = _run(ns, _tool("iptables-save")).stdout
    for table in ("mangle", "filter", "nat"):
        want, got = rules_by_chain(text, table), rules_by_chain(saved, table)
        assert want and got == want, (table, got, want)
    # the representative parts are there (the comparison above would pass on an empty export)
    assert "-A SNATGW_SNAT -p tcp -m connmark --mark" in saved and "--persistent" in saved
    assert "--to-source 198.19.2.71-198.19.2.72:20000-29999 --random" in saved
    assert [ln for ln in saved.splitlines()  # unmatched drop, from the one inside device
            if ln.startswith("-A SNATGW_FWD -i lan40 ") and ln.endswith(" -j DROP")]
    assert saved.count("-j MARK --set-xmark") == 2  # the two new_gw rules steer in prerouting
    for jump in ("-A PREROUTING -j SNATGW_STEER", "-A FORWARD -j SNATGW_MATCH", "-A FORWARD -j SNATGW_FWD",
                 "-A POSTROUTING -j SNATGW_SNAT"):  # fmt: skip
        assert saved.count(jump + "\n") == 1, jump


def test_an_empty_rule_set_loads_too(tmp_path, capsys, ns):
    """A config with no rules (the service on, nothing to translate) exports chains that load."""
    text = _export(tmp_path, capsys, "snatgw {\n inside lan40\n}\nvirtual_server fwmark 1 {\n}\n")
    p = _run(ns, _tool("iptables-restore"), "--noflush", stdin=text)
    assert p.returncode == 0 and not p.stderr, p.stderr
    assert "-A POSTROUTING -j SNATGW_SNAT" in _run(ns, _tool("iptables-save")).stdout


@pytest.mark.parametrize("dev", ['a"b', "a\\b", 'x"\\y"'])
def test_a_device_name_with_a_quote_or_backslash_loads_as_that_device(dev, ns):
    """The kernel allows '"' and '\\' in a device name; iptables-restore reads '"' as a quote:
    `-o a"b` loaded as the device 'ab -j DROP' (the rest of the line, cut) with no target, so
    the guard and SNAT lines of that rule matched nothing they were meant to."""
    rules = RuleSet([Rule(src=IPv4Network("198.18.60.0/24"), oif=dev, pool=Pool.parse("198.19.2.71"),
                          algo=Algo.SDH)])  # fmt: skip
    text, _ = render_iptables(rules, Settings(inside=(dev,), outside=(dev,)))
    p = _run(ns, _tool("iptables-restore"), "--noflush", stdin=text)
    assert p.returncode == 0 and not p.stderr, p.stderr
    r = next(iter(rules))
    # iptables -S prints the name raw: the whole line is known, so no parsing is needed
    guard = _run(ns, _tool("iptables"), "-S", "SNATGW_GUARD").stdout.splitlines()
    assert guard[1:] == [f'-A SNATGW_GUARD -s 198.18.60.0/24 -o {dev} -m comment --comment '
                         f'"snatgw {r.rule_id:08x}" -j DROP'], guard  # fmt: skip
    match = _run(ns, _tool("iptables"), "-t", "mangle", "-S", "SNATGW_MATCH").stdout
    assert f" -i {dev} -o {dev} -m conntrack" in match and "-j CONNMARK --set-xmark" in match, match


def test_a_trailing_plus_is_said_to_be_a_wildcard():
    """`-o eth+` is every device starting with eth to iptables: no line names `eth+` alone, so
    the export says so (it said nothing, and the rule took every ethN)."""
    rules = RuleSet([Rule(src=IPv4Network("198.18.60.0/24"), oif="eth+", pool=Pool(IPv4Address("198.19.2.71"),
                                                                                      IPv4Address("198.19.2.71")))])
    _, notes = render_iptables(rules, Settings(inside=("lan+",)))
    assert any("trailing + of eth+ as a wildcard: it matches every device whose name starts with eth" in n
               for n in notes), notes  # fmt: skip
    assert any(n.startswith("inside: iptables reads the trailing + of lan+") for n in notes), notes
