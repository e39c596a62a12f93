"""Three gateways side by side for the application tests (tests/lab/test_apps.py, issue 12):
kernel nftables SNAT (the reference), snatgw's nft backend and snatgw's bpf backend, each in a
lab of its own (tests/lab/conftest.new_lab) with the same two rules, so every check runs the
same third-party program through all three in one test and compares.

``each(gws, check)`` runs ``check(gw)`` on the three at once (threads: the slow checks wait
once, not three times) and returns an Outcome per mode; ``judge`` asserts that every check the
reference passes passes on both snatgw backends too, and that a check the reference fails is a
documented exception (docs/datapath.md, "Applications")."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field

from snatgw.lab.demo import SETTINGS
from snatgw.lab.gateway import start_kernel_snat
from snatgw.lab.netns import LabError
from snatgw.lab.topology import Lab
from snatgw.rules import Rule, RuleSet

MODES = ("kernel", "nft", "bpf")  # kernel = plain kernel nftables SNAT, the reference
SNATGW = ("nft", "bpf")
#: a second server address in `net` routed like the first (via ISP 1): STUN needs two
ALT_SERVER = "203.0.113.11"
SERVER = "203.0.113.10"
CLIENT = "198.18.40.10"  # the inside host the checks run on (node in40)

#: every inside net leaves by the link the route picks, from that link's pool
RULES = [
    {"from": "198.18.0.0/16", "oif": "eth1", "snat_ip": "198.19.2.71-198.19.2.73", "algo": "sdh"},
    {"from": "198.18.0.0/16", "oif": "eth2", "snat_ip": "198.19.3.71-198.19.3.73", "algo": "sdh"},
]


def config_text(rules: list[dict], extra_settings: str = "") -> str:
    fields = ("from", "to", "gw", "oif", "new_gw", "snat_ip", "algo", "mapping", "filtering", "port_preserve")
    body = "\n".join("  snat_rule { " + "  ".join(f"{k} {r[k]}" for k in fields if r.get(k)) + " }"
                     for r in rules)
    settings = SETTINGS.replace("}", extra_settings + "}") if extra_settings else SETTINGS
    return settings + "\nvirtual_server fwmark 1 {\n" + body + "\n}\n"


def ruleset(rules: list[dict]) -> RuleSet:
    keep = ("from", "to", "gw", "oif", "new_gw", "snat_ip", "algo")
    return RuleSet([Rule.from_dict({k: v for k, v in r.items() if k in keep}, where=f"apps rule {i + 1}")
                    for i, r in enumerate(rules)])


@dataclass
class AppGw:
    """One lab with one kind of gateway running the apps rules."""

    mode: str
    lab: object
    conf: str = ""
    rules: list = field(default_factory=lambda: list(RULES))

    @property
    def ns(self):
        return self.lab.ns

    def run(self, node: str, *cmd: str, timeout: float = 30.0, check: bool = True, input: str | None = None):
        return self.lab.run(node, *cmd, timeout=timeout, check=check, input=input)

    def popen(self, node: str, *cmd: str, **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        return self.lab.popen(node, *cmd, **kw)

    def configure(self, rules: list[dict], extra_settings: str = "") -> None:
        """Apply ``rules`` (the reference: as kernel SNAT, options it has no equivalent of ignored)."""
        self.rules = list(rules)
        self.lab.add_snat_addresses(ruleset(rules))
        if self.mode == "kernel":
            start_kernel_snat(self.lab, ruleset(rules))
            return
        with open(self.conf, "w") as f:
            f.write(config_text(rules, extra_settings))
        if self.lab.gateway_proc is None:
            self.lab.start_gateway(self.conf, self.mode)
        else:
            self.lab.reload_gateway(self.conf)


def new_lab(mode: str, extra: int | None = None) -> Lab:
    """A lab named like tests/lab/conftest's (so a dead run's are swept), prefix sga<pid><i>;
    ``extra`` n: one more lab of ``mode`` beside the module's three (prefix sga<pid>x<n>)."""
    if extra is None:
        return Lab.up(f"pytest-{os.getpid()}-apps-{mode}", prefix=f"sga{os.getpid() % 0xFFFF:04x}{MODES.index(mode)}")
    return Lab.up(f"pytest-{os.getpid()}-apps-x{extra}-{mode}", prefix=f"sga{os.getpid() % 0xFFFF:04x}x{extra}")


def build(mode: str, extra: int | None = None) -> AppGw:
    """A lab (new_lab) with ``mode``'s gateway running RULES."""
    lab = new_lab(mode, extra)
    gw = AppGw(mode, lab, conf=os.path.join(lab.workdir, f"apps-{mode}.conf"))
    try:
        lab.ip("net", "addr", "add", f"{ALT_SERVER}/32", "dev", "lo")
        gw.configure(RULES)
    except BaseException:
        lab.down()
        raise
    return gw


@dataclass
class Outcome:
    ok: bool
    detail: str
    value: object = None  # what the check returned (derived checks judge it further)


def each(gws: dict, check, modes=MODES) -> dict[str, Outcome]:
    """Run ``check(gw)`` on every mode at once; a check passes when it returns (its value is
    the detail shown) and fails when it raises."""
    out: dict[str, Outcome] = {}

    def one(mode):
        try:
            v = check(gws[mode])
            out[mode] = Outcome(True, str(v), v)
        except Exception as e:  # noqa: BLE001 - any failure of the program is the outcome
            last = traceback.format_exception_only(type(e), e)[-1].strip()
            out[mode] = Outcome(False, last[:2000])

    threads = [threading.Thread(target=one, args=(m,)) for m in modes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


#: check name -> outcome per mode, for the summary (test_zz_scoreboard)
SCOREBOARD: dict[str, dict[str, Outcome]] = {}


def judge(name: str, results: dict[str, Outcome], reference_fails: str | None = None,
          known: dict[str, str] | None = None) -> None:
    """The reference passes (or, when ``reference_fails`` gives the documented reason, fails)
    and each snatgw backend passes wherever the reference does, except the modes ``known``
    names with the documented reason why they fail on purpose (they must fail, so a change of
    behaviour shows)."""
    known = known or {}
    SCOREBOARD[name] = results
    lines = [f"{m:7} {'pass' if r.ok else 'FAIL'}  {r.detail}" for m, r in results.items()]
    report = f"{name}:\n  " + "\n  ".join(lines)
    ref = results.get("kernel")
    if ref is not None:
        if reference_fails is None:
            assert ref.ok, f"the reference (kernel SNAT) fails: the lab is broken\n{report}"
        else:
            assert not ref.ok, f"the reference now passes, update the exception ({reference_fails})\n{report}"
    for m, why in known.items():
        assert not results[m].ok, f"snatgw {m} now passes: update docs/datapath.md ({why})\n{report}"
    failed = [m for m in SNATGW if m in results and m not in known and not results[m].ok
              and (ref is None or ref.ok)]
    assert not failed, f"snatgw {', '.join(failed)} fails where kernel SNAT passes\n{report}"


def wait_port(gw: AppGw, node: str, port: int, proto: str = "tcp", timeout: float = 10.0) -> None:
    """Wait until something listens on ``port`` in ``node`` (ss), or raise."""
    flag = "-ltn" if proto == "tcp" else "-lun"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = gw.run(node, "ss", "-H", flag, f"sport = :{port}", check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise LabError(f"nothing listens on {proto} port {port} in {gw.ns(node)} after {timeout:g} s")
