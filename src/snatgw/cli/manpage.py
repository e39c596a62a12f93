"""snatgw(8) in roff, generated from the argparse parsers of every verb (``build_parser``), so the
man page lists exactly the verbs and options the command takes.  `make install` runs
``python -m snatgw.cli.manpage > snatgw.8``; a test renders it with groff and checks every verb.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from .main import VERBS, build_parser

FILES = (
    ("/etc/snatgw/snatgw.conf", "the configuration (docs/config.md); `snatgw check` validates it"),
    ("/run/snatgw/control.sock", "the running daemon's control socket (mode 0600)"),
    ("/sys/fs/bpf/snatgw", "the bpf backend's pinned maps: sessions survive a daemon restart"),
    ("/var/cache/snatgw", "compiled BPF objects (XDG_CACHE_HOME=/var/cache in the systemd unit)"),
)
EXIT = (("0", "success (explain: a rule matched, or the flow's live session translates it; status: healthy)"),
        ("1", "explain: no rule matched; status: unhealthy (the problems are printed); import-iptables: "
              "something was not carried over; demo: a flow was not as the model predicts"),
        ("2", "bad arguments or an invalid configuration: nothing was changed"),
        ("3", "the datapath could not be set up"), ("4", "no daemon answered, or it refused the request"))


def esc(text: str) -> str:
    """Text safe for a roff line: backslashes escaped, hyphens in words as \\-, no leading dot."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def lines(text: str) -> list[str]:
    """A block of text as roff lines, keeping its line breaks (.nf/.fi when it is indented)."""
    out: list[str] = []
    for para in text.strip("\n").split("\n\n"):
        rows = para.split("\n")
        if any(r.startswith(" ") for r in rows):
            out += [".PP", ".nf"] + [esc(r) for r in rows] + [".fi"]
        else:
            out += [".PP"] + [esc(r.strip()) for r in rows]
    return out


def options(p: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                out += [".TP", f"\\fB{esc(name)}\\fR", esc(sp.description or "")]
                out += [".RS"] + options(sp) + [".RE"]
            continue
        if a.help == argparse.SUPPRESS:
            continue
        if a.option_strings:
            metavar = "" if a.nargs == 0 else " \\fI" + esc(str(a.metavar or a.dest.upper())) + "\\fR"
            head = ", ".join(f"\\fB{esc(o)}\\fR" for o in a.option_strings) + metavar
        else:
            head = f"\\fI{esc(str(a.metavar or a.dest))}\\fR"
        text = a.help or ""
        if a.choices and not isinstance(a.choices, dict):
            text += f" (one of {', '.join(map(str, a.choices))})"
        out += [".TP", head, esc(text.replace("%%", "%"))]
    return out


def verb_section(verb: str, p: argparse.ArgumentParser) -> list[str]:
    usage = " ".join(p.format_usage().split())
    usage = usage.removeprefix("usage: ")
    out = [f'.SS "{esc(verb)}"', ".nf", esc(usage), ".fi"]
    if verb == "adm":  # takes ipvsadm's own arguments: its usage text is the reference
        from .commands.adm import USAGE

        return out + lines(USAGE.split("\n", 1)[1])
    out += lines(p.description or "")
    return out + options(p)


def render() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = [
        f'.TH SNATGW 8 "" "snatgw {__version__}" "System Administration"',
        ".SH NAME", "snatgw \\- multi\\-ISP source\\-NAT gateway (lvs\\-snat rebuilt on eBPF and nftables)",
        ".SH SYNOPSIS", ".B snatgw", "\\fIVERB\\fR [\\fIoptions\\fR]", ".br", ".B snatgw", "[\\fB\\-\\-version\\fR]",
        ".SH DESCRIPTION",
        esc("snatgw translates the source address of traffic from internal networks to a public address of the "
            "ISP link it leaves by, chosen per rule from a pool (lvs-snat's snat_rule: source net, destination "
            "net, egress interface and next hop; sh, sdh or random address selection; new_gw). It runs as a "
            "daemon (snatgw run, usually from the systemd unit snatgw.service) over an eBPF TC datapath or "
            "nftables; the other verbs validate and explain configurations and talk to the running daemon."),
        ".SH COMMANDS",
    ]
    for verb in VERBS:
        if verb in sub.choices:
            out += verb_section(verb, sub.choices[verb])
    out += [".SH FILES"]
    for path, what in FILES:
        out += [".TP", f"\\fI{esc(path)}\\fR", esc(what)]
    out += [".SH ENVIRONMENT", ".TP", "\\fBSNATGW_SOCKET\\fR",
            esc("the control socket the client verbs use when --socket is not given")]
    out += [".SH EXIT STATUS"]
    for code, what in EXIT:
        out += [".TP", code, esc(what)]
    out += [".SH SEE ALSO", "\\fBipvsadm\\fR(8), \\fBnft\\fR(8), \\fBkeepalived\\fR(8), "
            "\\fBsystemd.service\\fR(5); the documents in /usr/local/share/doc/snatgw (config.md, operations.md)"]
    return "\n".join(out) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
