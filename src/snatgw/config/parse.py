"""The keepalived-style config parser: text -> GatewayConfig, and render_config back to text.

Grammar (keepalived's, as lvs-snat's keepalived and the seed write it; `#` and `!` start a
comment to end of line; a keyword's value is on the keyword's line; several keywords may share
a line; `{` may open on the same line or the next; `;` separates like a line end)::

    snatgw {                                  # snatgw's own settings, all optional
        inside lan40 lan50                    # one or more interface names
        outside eth1 eth2
        port_range 5000-65535                 # or a single port
        port_tries 128                        # candidates per SNAT address, 1..1024
        max_sessions 262144
        on_exhausted spill|drop               # default: spill for sdh/random, drop for sh
        max_sessions_per_host 0               # live sessions per inside host, 0 = no limit
        port_preserve no|yes                  # yes: the first port tried is the inside port itself
        refuse_icmp no|yes                    # ICMP host unreachable to a host over its limit
        unmatched pass|drop
        inbound drop|routed                   # routed: let uplink packets without a session through
        backend bpf|nft
        timeout tcp_established 7440          # any name of schema.TIMEOUT_NAMES, seconds
        gc_interval 1                         # seconds
        control_socket /run/snatgw/control.sock
        pin_dir /sys/fs/bpf/snatgw
        snat_addresses external|manage        # manage: the daemon adds the pool addresses
        allow_empty no|yes                    # yes: a config without snat_rule may run
        metrics_listen 127.0.0.1:9469         # Prometheus /metrics (default: off)
        audit_log /var/log/snatgw/audit.jsonl # or syslog: session create/end records (default: off)
        audit_log_max_size 100M               # rotate the file at this size (K, M, G)
        audit_log_keep 5                      # rotated files kept
        rps_cpus off|all|0-3,6                # receive packet steering of the devices (daemon/rps.py)
        sync_peer 192.0.2.2                   # session sync with the HA peer (bpf; daemon/sync.py)
        sync_local 192.0.2.1                  # our address on the sync link
        sync_port 3781                        # UDP
        sync_key /etc/snatgw/sync.key         # shared secret (>= 32 bytes, mode 0600, owned by root)
        sync_interval 1                       # seconds between heartbeats (0.1..60)
        sync_refresh 10                       # seconds between two sends of the whole table (1..3600)
    }
    virtual_server fwmark 1 {                 # the SNAT service
        snat_rule { from 198.18.40.0/24 gw 198.19.2.1 oif eth1 snat_ip 198.19.2.71-198.19.2.73 algo sdh }
        # a rule may set on_exhausted, max_sessions_per_host and port_preserve of its own, and
        # mapping endpoint-independent (with algo sh) plus filtering address-port-dependent|
        # address-dependent|endpoint-independent (RFC 4787 NAT behaviour, docs/datapath.md)
    }
    link isp1 {                               # probed next hop, automatic failover (config/links.py)
        gw 198.19.2.1  oif eth1  probe 203.0.113.10  backup_gw 198.19.3.1  backup_snat_ip 198.19.3.71
    }

Other keepalived blocks (global_defs, vrrp_*, other virtual_servers, real_server and the
usual virtual_server options inside fwmark 1) are skipped with a warning, so a whole
keepalived.conf can be read.  Every error is a ConfigError "file:line: field: message".
"""

from __future__ import annotations

import difflib
import gc
import logging
import math
import os
import re
import stat
import unicodedata
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from ..errors import ConfigError, RuleError
from ..layout import PORT_TRIES_MAX
from ..rules import ANY_NET, Pool, Rule, RuleSet, parse_addr, parse_algo, parse_gw, parse_host_limit, parse_net
from ..rules import FILTERINGS, MAPPINGS, non_ascii_named, parse_choice, parse_on_exhausted, parse_oif, parse_yes_no
from . import MAX_CONFIG_BYTES, MAX_SOCKET_PATH
from .links import INTERVAL_RANGE, LINK_KEYWORDS, MAX_TARGETS, Link
from .schema import (AUDIT_LOG_MAX_KEEP, BACKENDS, ON_EXHAUSTED, SNAT_ADDRESS_MODES, SYNC_INTERVAL_RANGE, SYNC_KEY_MIN,
                     SYNC_PORT, SYNC_REFRESH_RANGE, TIMEOUT_BY_STATE, TIMEOUT_NAMES, GatewayConfig, Settings)
from .schema import timeout_floor_warning

log = logging.getLogger("snatgw.config")

#: snat_rule keywords, in the order render_config writes them
RULE_KEYWORDS = ("from", "to", "gw", "oif", "new_gw", "snat_ip", "algo", "on_exhausted", "max_sessions_per_host",
                 "mapping", "filtering", "port_preserve")
#: snatgw block keywords
SETTINGS_KEYWORDS = (
    "inside", "outside", "port_range", "port_tries", "max_sessions", "on_exhausted",
    "max_sessions_per_host", "refuse_icmp", "port_preserve", "unmatched", "inbound", "backend", "timeout", "gc_interval",
    "control_socket", "pin_dir", "snat_addresses", "allow_empty", "metrics_listen",
    "audit_log", "audit_log_max_size", "audit_log_keep", "rps_cpus",
    "sync_peer", "sync_local", "sync_port", "sync_key", "sync_interval", "sync_refresh",
)  # fmt: skip
#: keepalived virtual_server options that mean nothing to snatgw (skipped with a warning)
KEEPALIVED_VS_OPTIONS = frozenset(
    "delay_loop lb_algo lvs_sched lb_kind lvs_method protocol persistence_timeout "
    "persistence_granularity virtualhost sorry_server sorry_server_inhibit alpha omega quorum "
    "hysteresis quorum_up quorum_down ha_suspend ops syn_proxy laddr_group_name "
    "local_address_group est_timeout abs_priority inhibit_on_failure retry delay_before_retry "
    "ip_family virtualhost".split()
)
#: keepalived's top-level keywords (skipped with a warning); any other top-level word is an
#: error, so that a typo such as `snatg {` is not skipped silently
KEEPALIVED_TOP = frozenset(
    "global_defs virtual_server virtual_server_group include linkbeat_use_polling net_namespace "
    "instance use_pid_dir local_address_group garp_group child_wait_time namespace_with_ipsets "
    "real_server_group".split()
)
KEEPALIVED_TOP_PREFIXES = ("vrrp_", "static_", "track_", "bfd_", "$", "@")
#: what an error message may quote from the file: a word of config text (keywords, addresses,
#: names, numbers, paths).  Anything else (a password hash, binary, control characters, a very
#: long word) is described, never echoed: `snatgw reload /etc/shadow` must not put the file's
#: content into the reply or the log.
_SHOWABLE = re.compile(r"[A-Za-z0-9_.:/,+@%\[\]-]{1,64}\Z")
_ASCII_INT = re.compile(r"[0-9]+\Z")
_ASCII_SECONDS = re.compile(r"[0-9]+(\.[0-9]*)?\Z|\.[0-9]+\Z")


def shown(text: str) -> str:
    """``text`` quoted when it is printable config text, else a description of it.  Config
    text but for a non-ASCII character (a look-alike letter: 'nfт'): quoted with it escaped,
    and named."""
    if _SHOWABLE.match(text) or text in ("{", "}"):  # a brace is a token of its own: `link isp1 }`
        return repr(text)
    if not text:  # (not "a word of 0 characters that is not config text")
        return "nothing"
    if len(text) <= 64 and text.isprintable() and _SHOWABLE.match(
            "".join(c if ord(c) < 128 else "x" for c in text)):
        return f"{ascii(text)} ({non_ascii_named(text)}: a look-alike letter?)"
    return f"a word of {len(text)} characters that is not config text (not shown)"


def _field(text: str | None) -> str | None:
    return text if text is None or _SHOWABLE.match(text) else "(word not shown)"


#: letters of other scripts that look like Latin ones (a keyword typed on another keyboard
#: layout, or pasted from a document): folded to ASCII only to find the keyword a word resembles
_CONFUSABLE = str.maketrans({
    **dict(zip("аеорсуххіјѕкмтнвԁһӏ", "aeopcyxxijskmthbdhl")),
    **dict(zip("АВЕКМНОРСТХІЈЅ", "ABEKMHOPCTXIJS")),
    **dict(zip("αβεικνορτυχ", "abeiknoptux")),
    **dict(zip("ΑΒΕΖΗΙΚΜΝΟΡΤΥΧ", "ABEZHIKMNOPTYX")),
    "\u2010": "-", "\u2011": "-", "\u2013": "-", "\u2212": "-", "\uff3f": "_",
})


def _fold(text: str) -> str:
    """``text`` with look-alike letters and compatibility forms (fullwidth, ligatures, accents)
    made ASCII where they have an ASCII twin; other non-ASCII characters stay."""
    t = unicodedata.normalize("NFKD", text.translate(_CONFUSABLE))
    return "".join(c for c in t if not unicodedata.combining(c))


def unknown_word(cur: "_Cursor", t: Token, msg: str, keywords) -> ConfigError:
    """The error for a word that is not a keyword here: file:line, the word as written, and
    when it holds a non-ASCII character, which one and at which column of the line (a Cyrillic
    'а' in `virtual_server` looks right on screen); the keyword it resembles, if one does.
    A word that is not config text once its non-ASCII characters are set aside is still not
    shown (the /etc/shadow rule)."""
    text, hints = t.text, []
    bad = next((i for i, c in enumerate(text) if ord(c) > 127), None)
    showable = bool(_SHOWABLE.match(text))
    if bad is not None:
        c = text[bad]
        showable = (len(text) <= 64 and text.isprintable()
                    and bool(_SHOWABLE.match("".join(ch if ord(ch) < 128 else "x" for ch in text))))
        line = cur.line_text(t.line)
        at = line.find(text) if line is not None else -1
        col = (at + bad + 1) if at >= 0 else None
        name = unicodedata.name(c, "unnamed")
        hints.append(f"it holds the non-ASCII character U+{ord(c):04X} ({name})"
                     + (f" at column {col}" if col else f" (character {bad + 1} of the word)")
                     + (f", written {ascii(text)}" if showable else ""))
    if showable:
        close = difflib.get_close_matches(_fold(text).lower(), list(keywords), n=1, cutoff=0.75)
        if close and close[0] != text:
            hints.append(f"did you mean '{close[0]}'?")
    field = text if showable else "(word not shown)"
    return ConfigError(msg + ("; " + "; ".join(hints) if hints else ""), field, cur.where(t.line))


class Token(NamedTuple):  # a tuple: 100,000-rule files make a million of them
    text: str
    line: int
    eol: bool = False  # a line end (or `;`): ends a keyword's values


# --------------------------------------------------------------------------- tokens


def tokenize(text: str) -> list[Token]:
    """Words and braces with their line numbers; comments dropped; a line end is a token."""
    # Token(...) with keywords is slow at a million tokens: the tuples are made directly
    out: list[Token] = []
    add, tok = out.append, tuple.__new__
    for n, line in enumerate(text.splitlines(), 1):
        if "#" in line or "!" in line:
            line = line[: min(i for i in (line.find("#"), line.find("!")) if i >= 0)]
        if "{" in line or "}" in line or ";" in line:
            line = line.replace("{", " { ").replace("}", " } ").replace(";", " ; ")
        for word in line.split():
            add(tok(Token, (word, n, word == ";")))
        add(tok(Token, ("", n, True)))
    return out


class _Cursor:
    """Walks the tokens; knows the file name for "file:line" messages."""

    #: the CPUs of `rps_cpus` must be online on this machine (the daemon: `run`, a reload); off
    #: for `snatgw check`, which may run on another machine than the gateway: a warning there
    cpus_here = True

    def __init__(self, tokens: list[Token], filename: str, text: str | None = None):
        self.toks = tokens
        self.i = 0
        self.filename = filename
        self.text = text  # the source, for the column of an error (only read on an error)

    def line_text(self, line: int) -> str | None:
        if self.text is None:
            return None
        lines = self.text.splitlines()
        return lines[line - 1] if 0 < line <= len(lines) else None

    def where(self, line: int) -> str:
        return f"{self.filename}:{line}"

    def error(self, line: int, field: str | None, msg: str) -> ConfigError:
        return ConfigError(msg, _field(field), self.where(line))

    def skip_eol(self) -> None:
        while self.i < len(self.toks) and self.toks[self.i].eol:
            self.i += 1

    def peek(self) -> Token | None:
        self.skip_eol()
        return self.toks[self.i] if self.i < len(self.toks) else None

    def next(self) -> Token | None:
        t = self.peek()
        if t is not None:
            self.i += 1
        return t

    def values(self) -> list[Token]:
        """The rest of the current line up to a brace (a keyword's arguments)."""
        out = []
        while self.i < len(self.toks):
            t = self.toks[self.i]
            if t.eol or t.text in "{}":
                break
            out.append(t)
            self.i += 1
        return out

    def open_brace(self, keyword: Token) -> None:
        """Expect `{` on the keyword's line or the next non-blank one."""
        t = self.peek()
        if t is None or t.text != "{":
            got = shown(t.text) if t else "end of file"
            raise self.error(keyword.line, keyword.text, f"expected '{{' to open the block, got {got}")
        self.i += 1

    def skip_block(self, opener: Token) -> None:
        """Skip to the `}` matching an already consumed `{`."""
        # openers of the blocks still open; the first word of the latest statement
        stack, head, at_start = [opener], None, True
        while stack:
            if self.i >= len(self.toks):
                o = stack[-1]  # the innermost unclosed block is the useful one to name
                raise self.error(o.line, o.text, "block opened here is never closed (missing '}')")
            t = self.toks[self.i]
            self.i += 1
            if t.text == "{":
                stack.append(head or t)
                head = None
            elif t.text == "}":
                stack.pop()
                head = None
            elif not t.eol and at_start:
                head = t
            at_start = t.eol or t.text in "{}"

    def maybe_block(self) -> bool:
        """True (and consumes it) when the next token is `{`, on this line or the next."""
        t = self.peek()
        if t is not None and t.text == "{":
            self.i += 1
            return True
        return False


# --------------------------------------------------------------------------- parsing


def read_config(path: str | Path, what: str = "a config") -> str:
    """The text of a config file: a regular file of at most MAX_CONFIG_BYTES in UTF-8 (a byte
    order mark at its start is dropped, CR LF line ends are line ends; ``what``: the file's kind,
    for the errors).  A FIFO,
    a device (/dev/zero), a directory or a huge file is refused before anything is read (opened
    with O_NONBLOCK, so a FIFO without writer cannot hang the daemon)."""
    path = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise ConfigError(f"cannot read {what.split()[-1]}: {e.strerror or e}", None, path) from None
    except ValueError as e:  # a NUL in the path (a control request's `path`): no file has such a name
        raise ConfigError(f"cannot read {what.split()[-1]}: {e}", None, repr(path)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"not a regular file; {what} is a text file", None, path)
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{st.st_size} bytes: larger than the {MAX_CONFIG_BYTES} bytes {what} may "
                              "have", None, path)
        chunks, size = [], 0
        while True:  # the file may grow while it is read: never read more than the bound
            chunk = os.read(fd, min(1 << 20, MAX_CONFIG_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_CONFIG_BYTES:
                raise ConfigError(f"larger than the {MAX_CONFIG_BYTES} bytes {what} may have", None, path)
    except OSError as e:
        raise ConfigError(f"cannot read {what.split()[-1]}: {e.strerror or e}", None, path) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    try:  # utf-8-sig: a byte order mark at the start (Windows editors write one) is dropped, not a word
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text ({e.reason} at byte {e.start})", None, path) from None


def parse_file(path: str | Path, warnings: list[str] | None = None, cpus_here: bool = True) -> GatewayConfig:
    text = read_config(path)
    loose = file_access_warning(str(path))
    if loose:
        (warnings.append if warnings is not None else log.warning)(loose)
    return parse_text(text, str(path), warnings, cpus_here)


def file_access_warning(path: str) -> str | None:
    """Why others than the daemon's user (root) could change the config at ``path``: the file
    writable by group or others, owned by another user, or in a directory others may write
    (without the sticky bit, which keeps them from replacing it).  Whoever can write it sets
    the rules and the files the daemon writes as root (audit_log).  None when only root can."""
    me = os.geteuid()
    d = os.path.dirname(os.path.abspath(path))
    for at, what in ((path, ""), (d, f"its directory {d} ")):
        try:
            st = os.stat(at)
        except OSError:
            return None
        if st.st_uid not in (0, me):
            return (f"{path}: {what}is owned by uid {st.st_uid}, not by uid {me} (the daemon's user): its owner "
                    "sets the rules and the files the daemon writes (audit_log); chown it to root")
        w = st.st_mode & 0o022
        if w and not (what and st.st_mode & stat.S_ISVTX):
            who = "group and others" if w == 0o022 else "group" if w == 0o020 else "others"
            return (f"{path}: {what}is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}): whoever can write "
                    "it sets the rules and the files the daemon writes (audit_log); chmod go-w it")
    return None


def require_rules(cfg: GatewayConfig) -> GatewayConfig:
    """A config the daemon may run: one with at least one rule, or one that says on purpose
    that it has none (`allow_empty yes` in the snatgw block).  An empty or truncated file
    would otherwise turn NAT off for everyone."""
    if len(cfg.rules) == 0 and not cfg.settings.allow_empty:
        inc = (f"; the rules may be in a file that an `include` names ({', '.join(cfg.includes)}): snatgw does "
               "not follow include, so give it that file or put the rules here") if cfg.includes else ""
        raise ConfigError(
            "no snat_rule: a config without rules would turn NAT off (an empty or truncated file?); "
            f"write `allow_empty yes` in the snatgw block to run without rules on purpose{inc}",
            "snat_rule", cfg.source or "<config>")
    return cfg


def parse_text(text: str, filename: str = "<string>", warnings: list[str] | None = None,
               cpus_here: bool = True) -> GatewayConfig:
    """Parse config text.  Warnings (skipped blocks) go to ``warnings`` when given, else to the log.
    ``cpus_here``: an `rps_cpus` CPU that is not online on this machine is an error (the daemon);
    False (`snatgw check`, perhaps on another machine than the gateway): a warning."""
    # no cyclic garbage collection while parsing: a 10,000-rule file makes ~150,000 tuples that
    # live until the end of the parse, which set off full collections of the daemon's whole heap
    # in the middle of a reload; what the parse leaves is freed by reference counts
    was = gc.isenabled()
    gc.disable()
    try:
        return _parse_text(text, filename, warnings, cpus_here)
    finally:
        if was:
            gc.enable()


def _parse_text(text: str, filename: str, warnings: list[str] | None, cpus_here: bool = True) -> GatewayConfig:
    warn = warnings.append if warnings is not None else log.warning
    cur = _Cursor(tokenize(text), filename, text)
    cur.cpus_here = cpus_here
    rules: list[Rule] = []
    links: list[Link] = []
    vmac: list[str] = []
    includes: list[str] = []
    settings = Settings()
    seen: dict[str, Token] = {}
    while (t := cur.next()) is not None:
        if t.text == "}":
            raise cur.error(t.line, None, "unexpected '}' with no block open")
        if t.text == "{":
            raise cur.error(t.line, None, "unexpected '{' with no keyword before it")
        args = cur.values()
        if t.text == "snatgw":
            _once(cur, seen, t)
            _no_args(cur, t, args)
            cur.open_brace(t)
            settings = _parse_settings(cur, t, warn)
        elif t.text == "link":
            links.append(_parse_link(cur, t, args, links))
        elif t.text == "virtual_server" and [a.text for a in args] == ["fwmark", "1"]:
            _once(cur, seen, t, "virtual_server fwmark 1")
            cur.open_brace(t)
            rules.extend(_parse_service(cur, t, warn))
        elif t.text not in KEEPALIVED_TOP and not t.text.startswith(KEEPALIVED_TOP_PREFIXES):
            raise unknown_word(
                cur, t,
                "unknown top-level keyword; expected snatgw or virtual_server fwmark 1 (keepalived's "
                "global_defs, vrrp_*, static_*, other virtual_servers ... are skipped)",
                ("snatgw", "virtual_server", "link", *sorted(KEEPALIVED_TOP)),
            )  # fmt: skip
        else:
            label = " ".join([t.text] + [a.text for a in args])
            if cur.maybe_block():
                start = cur.i
                cur.skip_block(t)
                if t.text == "virtual_server":  # rules there would be skipped: refused, not warned of
                    rule = next((x for x in cur.toks[start:cur.i] if x.text == "snat_rule"), None)
                    if rule is not None:
                        raise cur.error(rule.line, "snat_rule", f"in '{label}' (line {t.line}): only "
                                        "`virtual_server fwmark 1` holds the SNAT rules (lvs-snat's switch); "
                                        "this block is keepalived's and would be skipped with its rules")
                elif t.text == "vrrp_instance" and any(x.text == "use_vmac" for x in cur.toks[start:cur.i]):
                    vmac.append(cur.where(t.line))
                warn(f"{cur.where(t.line)}: skipped keepalived block '{label}' (not the SNAT service)")
            else:
                if t.text == "include":
                    includes.append(cur.where(t.line))
                warn(f"{cur.where(t.line)}: skipped keepalived line '{label}'")
    try:
        ruleset = RuleSet(rules)
    except ConfigError:
        raise
    except RuleError as e:
        raise ConfigError(e.message, e.field, e.where) from None
    if settings.backend == "nft":
        for r in ruleset.defined:
            why = nft_refuses(r)
            if why:
                raise ConfigError(why, "filtering", r.where)
    return GatewayConfig(rules=ruleset, settings=settings, source=filename, links=tuple(links), use_vmac=tuple(vmac),
                         includes=tuple(includes))


def nft_refuses(rule: Rule) -> str | None:
    """Why the nft backend cannot honour a rule's NAT behaviour options (None: it can; what it
    does with the others: docs/nftables.md "NAT behaviour options")."""
    if rule.filter_mode != "address-port-dependent":
        return (f"expected address-port-dependent with backend nft, got {rule.filtering}: netfilter's "
                "conntrack lets in only replies from the remote address and port a session was made "
                "toward (use backend bpf for address-dependent or endpoint-independent filtering)")
    return None


def _once(cur: _Cursor, seen: dict[str, Token], t: Token, label: str | None = None) -> None:
    label = label or t.text
    if label in seen:
        raise cur.error(t.line, t.text, f"a second '{label}' block; the first is at {cur.where(seen[label].line)}")
    seen[label] = t


def _no_args(cur: _Cursor, t: Token, args: list[Token]) -> None:
    if args:
        raise cur.error(t.line, t.text, f"expected '{{' after {t.text}, got {shown(args[0].text)}")


def _parse_service(cur: _Cursor, opener: Token, warn) -> list[Rule]:
    """Body of `virtual_server fwmark 1 { ... }` up to its `}`."""
    rules = []
    while True:
        t = cur.next()
        if t is None:
            raise cur.error(opener.line, "virtual_server", "block opened here is never closed (missing '}')")
        if t.text == "}":
            return rules
        if t.text == "{":
            raise cur.error(t.line, None, "unexpected '{' with no keyword before it")
        args = cur.values()
        if t.text == "snat_rule":
            _no_args(cur, t, args)
            cur.open_brace(t)
            rules.append(_parse_rule(cur, t))
        elif t.text == "real_server" or t.text in KEEPALIVED_VS_OPTIONS:
            if cur.maybe_block():
                cur.skip_block(t)
            warn(f"{cur.where(t.line)}: skipped '{t.text}' in virtual_server fwmark 1 (means nothing to SNAT)")
        else:
            raise unknown_word(
                cur, t,
                "unknown keyword in virtual_server fwmark 1; expected snat_rule "
                "(keepalived's real_server and virtual_server options are skipped)",
                ("snat_rule", "real_server", *sorted(KEEPALIVED_VS_OPTIONS)),
            )  # fmt: skip


def _next_keyword(cur: _Cursor, opener: Token, block: str, keywords) -> Token | None:
    """The next keyword of a block's body, or None at its `}`; errors for an unclosed block or
    an unknown keyword (both blocks share these rules)."""
    t = cur.next()
    if t is None:
        raise cur.error(opener.line, block, "block opened here is never closed (missing '}')")
    if t.text == "}":
        return None
    if t.text in ("{", "snat_rule", "virtual_server", "snatgw"):
        raise cur.error(opener.line, block, f"block opened here is not closed before line {t.line} "
                        "(missing '}')")
    if t.text not in keywords:
        raise unknown_word(cur, t, _unknown_in(block, t.text, keywords), keywords)
    return t


def _unknown_in(block: str, word: str, keywords) -> str:
    """"unknown BLOCK keyword; expected one of ...", saying so when the word is a snatgw { }
    setting given in a rule (`port_tries`, `refuse_icmp`: settings of every rule)."""
    msg = f"unknown {block} keyword; expected one of {', '.join(keywords)}"
    if block == "snat_rule" and word in SETTINGS_KEYWORDS:
        msg += f" ({word} is a setting of the snatgw {{ }} block, for every rule, not of one rule)"
    return msg


def _parse_rule(cur: _Cursor, opener: Token) -> Rule:
    """Body of `snat_rule { ... }` up to its `}`: keyword value pairs."""
    vals: dict[str, Token] = {}
    where = cur.where(opener.line)
    while (t := _next_keyword(cur, opener, "snat_rule", RULE_KEYWORDS)) is not None:
        if t.text in vals:
            raise cur.error(t.line, t.text, f"given twice in one snat_rule (first at line {vals[t.text].line})")
        # the value, and the word after it (which must be the next keyword), without reading
        # the rest of the line for every keyword (that made 100,000 one-line rules quadratic in
        # their length)
        toks, i = cur.toks, cur.i
        v = toks[i] if i < len(toks) and not toks[i].eol and toks[i].text not in "{}" else None
        if v is None:
            raise cur.error(t.line, t.text, "expected a value on the same line")
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if nxt is not None and not nxt.eol and nxt.text not in "{}" and nxt.text not in RULE_KEYWORDS:
            if (nxt.text in SETTINGS_KEYWORDS or not nxt.text.isascii()
                    or difflib.get_close_matches(nxt.text, RULE_KEYWORDS, n=1, cutoff=0.75)):
                # a misspelt keyword (a look-alike letter), or a snatgw { } setting (`port_tries`,
                # `refuse_icmp`: no rule has them), after a value: not a second value of it
                raise unknown_word(cur, nxt, _unknown_in("snat_rule", nxt.text, RULE_KEYWORDS), RULE_KEYWORDS)
            raise cur.error(t.line, t.text, f"expected one value, got also {shown(nxt.text)}")
        cur.i = i + 1
        vals[t.text] = v
    missing = [k for k in ("from", "snat_ip") if k not in vals]
    if missing:
        raise cur.error(opener.line, "snat_rule", f"missing {' and '.join(missing)} (required)")

    def at(k: str) -> str:
        return cur.where(vals[k].line)

    try:
        return Rule(
            src=parse_net(vals["from"].text, "from", at("from")),
            dst=parse_net(vals["to"].text, "to", at("to")) if "to" in vals else ANY_NET,
            gw=parse_gw(vals["gw"].text, "gw", at("gw")) if "gw" in vals else None,
            oif=parse_oif(vals["oif"].text, at("oif")) if "oif" in vals else None,
            new_gw=parse_gw(vals["new_gw"].text, "new_gw", at("new_gw")) if "new_gw" in vals else None,
            pool=Pool.parse(vals["snat_ip"].text, at("snat_ip")),
            algo=parse_algo(vals["algo"].text, at("algo")) if "algo" in vals else Rule.algo,
            on_exhausted=(parse_on_exhausted(vals["on_exhausted"].text, at("on_exhausted"))
                          if "on_exhausted" in vals else None),
            max_sessions_per_host=(parse_host_limit(vals["max_sessions_per_host"].text, at("max_sessions_per_host"))
                                   if "max_sessions_per_host" in vals else None),
            mapping=parse_choice(vals["mapping"].text, "mapping", MAPPINGS, at("mapping")) if "mapping" in vals else None,
            filtering=(parse_choice(vals["filtering"].text, "filtering", FILTERINGS, at("filtering"))
                       if "filtering" in vals else None),
            port_preserve=(parse_yes_no(vals["port_preserve"].text, "port_preserve", at("port_preserve"))
                           if "port_preserve" in vals else None),
            where=where,
        )
    except ConfigError:
        raise
    except RuleError as e:
        raise ConfigError(e.message, e.field, e.where) from None


def _parse_link(cur: _Cursor, opener: Token, args: list[Token], links: list[Link]) -> Link:
    """`link NAME { ... }` (snatgw.config.links): keyword value pairs, `probe` takes 1..8."""
    if len(args) != 1 or not re.fullmatch(r"[A-Za-z0-9_-]{1,15}", args[0].text):
        raise cur.error(opener.line, "link", "expected one name (letters, digits, - and _, at most 15) "
                        "before '{'")  # fmt: skip
    name = args[0].text
    for other in links:
        if other.name == name:
            raise cur.error(opener.line, "link", f"a second link {name!r}; the first is at {other.where}")
    cur.open_brace(opener)
    vals: dict[str, list[Token]] = {}
    while (t := _next_keyword(cur, opener, "link", LINK_KEYWORDS)) is not None:
        if t.text in vals:
            raise cur.error(t.line, t.text, f"given twice in one link (first at line {vals[t.text][0].line})")
        got = cur.values()
        words = []
        for a in got:  # several keywords may share a line
            if a.text in LINK_KEYWORDS:
                break
            words.append(a)
        cur.i -= len(got) - len(words)
        if not words:
            raise cur.error(t.line, t.text, "expected a value on the same line")
        if t.text != "probe" and len(words) > 1:
            raise cur.error(t.line, t.text, f"expected one value, got also {shown(words[1].text)}")
        if len(words) > MAX_TARGETS:
            raise cur.error(t.line, t.text, f"at most {MAX_TARGETS} probe targets, got {len(words)}")
        vals[t.text] = [t] + words
    missing = [k for k in ("gw", "probe", "backup_gw") if k not in vals]
    if missing:
        raise cur.error(opener.line, "link", f"link {name}: missing {', '.join(missing)} (required)")

    def one(k: str) -> Token:
        return vals[k][1]

    def num(k: str, lo: float, hi: float, integer: bool) -> float:
        v = one(k)
        # ASCII digits only, as every other number of the file: float() reads '١٢' as 12.0 and
        # str.isdigit() is true for it (`fall ١٢` was a fall of 12)
        x = int(v.text) if integer and _ASCII_INT.match(v.text) else _seconds(v.text)
        if not (math.isfinite(x) and lo <= x <= hi) or (integer and not _ASCII_INT.match(v.text)):
            kind = "an integer" if integer else "seconds, a number"
            raise cur.error(v.line, k, f"expected {kind} from {_fmt_num(lo)} to {_fmt_num(hi)}, got {shown(v.text)}")
        return x

    try:
        gw = parse_addr(one("gw").text, "gw", cur.where(one("gw").line))
        probe = tuple(parse_addr(v.text, "probe", cur.where(v.line)) for v in vals["probe"][1:])
        backup = parse_addr(one("backup_gw").text, "backup_gw", cur.where(one("backup_gw").line))
        link = Link(
            name=name, gw=gw, probe=probe, backup_gw=backup,
            oif=parse_oif(one("oif").text, cur.where(one("oif").line)) if "oif" in vals else None,
            source=parse_addr(one("source").text, "source", cur.where(one("source").line)) if "source" in vals else None,
            interval=num("interval", *INTERVAL_RANGE, False) if "interval" in vals else Link.interval,
            fall=int(num("fall", 1, 100, True)) if "fall" in vals else Link.fall,
            rise=int(num("rise", 1, 100, True)) if "rise" in vals else Link.rise,
            hold=num("hold", 0, 86400, False) if "hold" in vals else Link.hold,
            backup_pool=Pool.parse(one("backup_snat_ip").text, cur.where(one("backup_snat_ip").line))
            if "backup_snat_ip" in vals else None,
            where=cur.where(opener.line),
        )  # fmt: skip
    except RuleError as e:
        raise ConfigError(e.message, e.field, e.where) from None
    seen_probe: set = set()
    for v, a in zip(vals["probe"][1:], probe):  # a target named twice is a typo for another one
        if a in seen_probe:
            raise cur.error(v.line, "probe", f"{a} is named twice; name each target once (a reply from "
                            "any one keeps the link up: a repeated one adds nothing, another was meant)")
        seen_probe.add(a)
    if backup == gw:
        raise cur.error(one("backup_gw").line, "backup_gw", f"is the link's own gw {gw}: a backup must be another next hop")
    for other in links:
        if other.gw == gw:
            raise cur.error(one("gw").line, "gw", f"{gw} is already link {other.name}'s gw ({other.where})")
    return link


# --------------------------------------------------------------------------- settings


def _int(cur: _Cursor, t: Token, v: Token, lo: int, hi: int | None = None) -> int:
    rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
    # ASCII digits only: str.isdigit() is true for '²' (int() then raises) and '١٢' (int() reads 12)
    if not _ASCII_INT.match(v.text) or int(v.text) < lo or (hi is not None and int(v.text) > hi):
        raise cur.error(v.line, t.text, f"expected an integer {rng}, got {shown(v.text)}")
    return int(v.text)


def _choice(cur: _Cursor, t: Token, v: Token, choices: tuple[str, ...]) -> str:
    if v.text not in choices:
        raise cur.error(v.line, t.text, f"expected one of {', '.join(choices)}, got {shown(v.text)}")
    return v.text


def _path(cur: _Cursor, t: Token, v: Token) -> str:
    if not v.text.startswith("/"):
        raise cur.error(v.line, t.text, f"expected an absolute path, got {shown(v.text)}")
    return v.text


def _ifaces(cur: _Cursor, t: Token, args: list[Token]) -> tuple[str, ...]:
    if not args:
        raise cur.error(t.line, t.text, "expected one or more interface names on the same line")
    names = []
    for a in args:
        try:
            names.append(parse_oif(a.text, cur.where(a.line)))
        except RuleError as e:
            raise cur.error(a.line, t.text, e.message) from None
        if names.count(a.text) > 1:
            raise cur.error(a.line, t.text, f"interface {shown(a.text)} listed twice")
    return tuple(names)


def _parse_settings(cur: _Cursor, opener: Token, warn=log.warning) -> Settings:
    """Body of `snatgw { ... }` up to its `}`; a timeout below an RFC's floor is a warning."""
    s = Settings()
    given: dict[str, Token] = {}
    while (t := _next_keyword(cur, opener, "snatgw", SETTINGS_KEYWORDS)) is not None:
        if t.text in ("inside", "outside"):
            args = []
            while cur.i < len(cur.toks):  # interface names run to the line end or the next keyword
                a = cur.toks[cur.i]
                if a.eol or a.text in "{}" or a.text in SETTINGS_KEYWORDS:
                    break
                args.append(a)
                cur.i += 1
        else:
            arity = 2 if t.text == "timeout" else 1
            args = cur.values()
            if len(args) > arity and args[arity].text in SETTINGS_KEYWORDS:  # several on a line
                cur.i -= len(args) - arity
                args = args[:arity]
            if len(args) != arity:
                what = "a name and seconds" if arity == 2 else "a value"
                raise cur.error(t.line, t.text, f"expected {what} on the same line, got {len(args)} words")
        key = t.text if t.text != "timeout" else f"timeout {args[0].text}"
        if key in given:
            raise cur.error(t.line, t.text, f"given twice (first at line {given[key].line})")
        given[key] = t
        s = _apply_setting(cur, s, t, args)
        if t.text == "timeout":
            low = timeout_floor_warning(args[0].text, s.timeout(TIMEOUT_NAMES[args[0].text]))
            if low:
                warn(f"{cur.where(t.line)}: timeout {args[0].text}: {low}")
        elif t.text == "rps_cpus" and not cur.cpus_here:
            off = rps_cpus_offline(args[0].text, "on this machine")
            if off:
                warn(f"{cur.where(t.line)}: rps_cpus: {off}: `snatgw check` lets it pass, as it may run on another "
                     "machine than the gateway; `snatgw run` and a reload refuse them where they are not online")
    both = [i for i in s.outside if i in s.inside]
    if both:
        line = max(given["inside"].line, given["outside"].line)
        raise cur.error(line, "outside" if line == given["outside"].line else "inside",
                        f"interface {both[0]} is listed both inside (line {given['inside'].line}) "
                        f"and outside (line {given['outside'].line})")  # fmt: skip
    _check_sync(cur, s, given, opener)
    # every setting's line (and the block's own), for errors and warnings about one: "file:line: port_tries: ..."
    where = (("snatgw", cur.where(opener.line)), *((k, cur.where(g.line)) for k, g in given.items()))
    return replace(s, where=where)


SYNC_NEEDED = ("sync_peer", "sync_local", "sync_key")  # the others have defaults
SYNC_OPTIONAL = ("sync_port", "sync_interval", "sync_refresh")


def _check_sync(cur: _Cursor, s: Settings, given: dict[str, Token], opener: Token) -> None:
    """Session sync is all (peer, local address, key; the port optional) or nothing, and a
    bpf backend's only (nft: conntrackd)."""
    have = [k for k in (*SYNC_NEEDED, *SYNC_OPTIONAL) if k in given]
    if not have:
        return
    missing = [k for k in SYNC_NEEDED if k not in given]
    first = given[have[0]]
    if missing:
        raise cur.error(first.line, have[0], f"session sync needs {', '.join(missing)} as well "
                                             f"(sync_peer, sync_local and sync_key go together)")  # fmt: skip
    if s.backend == "nft":
        raise cur.error(first.line, have[0], "session sync is the bpf backend's; with backend nft use conntrackd "
                                             "(docs/operations.md \"Stateful failover (nft backend)\")")  # fmt: skip
    if s.sync_peer == s.sync_local:
        raise cur.error(given["sync_peer"].line, "sync_peer", f"the peer's address is sync_local's own ({s.sync_peer})")


def read_sync_key(path: str) -> bytes:
    """The shared secret of ``sync_key``: the file's bytes, white space stripped, >= SYNC_KEY_MIN
    of them; refused when group or others may read or write it or when it is not owned by the
    user reading it (the daemon's: root), as ssh refuses a private key, or when it is not a
    regular file.  ValueError saying what is wrong."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise ValueError(f"{path} is owned by uid {st.st_uid}, not by uid {os.geteuid()} (the daemon's user) "
                             f"that reads it; chown {os.geteuid()} it")  # fmt: skip
        if st.st_mode & 0o077:
            raise ValueError(f"{path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                             f"chmod 600 it")  # fmt: skip
        data = os.read(fd, 4097)
    finally:
        os.close(fd)
    if len(data) > 4096:
        raise ValueError(f"{path} holds more than 4096 bytes: expected a key, not {len(data)}+ bytes")
    key = data.strip()
    if len(key) < SYNC_KEY_MIN:
        raise ValueError(f"{path} holds {len(key)} bytes after stripping white space; a key needs at least "
                         f"{SYNC_KEY_MIN} (e.g. `head -c 32 /dev/urandom | base64 > {path}`)")
    return key


GC_INTERVAL_MAX = 3600  # seconds: gc_interval's bound (`snatgw run --gc-interval` too)


def _seconds(text: str) -> float:
    """A number of seconds as written (ASCII only: float() reads '١٢' as 12.0); NaN if not one."""
    try:
        return float(text) if _ASCII_SECONDS.match(text) else math.nan
    except ValueError:
        return math.nan


def _apply_setting(cur: _Cursor, s: Settings, t: Token, args: list[Token]) -> Settings:
    k, v = t.text, args[0] if args else None
    if k in ("inside", "outside"):
        return replace(s, **{k: _ifaces(cur, t, args)})
    if k == "port_range":
        lo, sep, hi = v.text.partition("-")
        if sep and not (lo and hi):  # `5000-`: its empty side was "a word of 0 characters"
            raise cur.error(v.line, k, f"expected MIN-MAX or one port N, got {shown(v.text)}: a number is missing "
                                       "on one side of '-'")
        a = _int(cur, t, Token(lo, v.line), 1, 65535)
        b = _int(cur, t, Token(hi, v.line), 1, 65535) if sep else a
        if b < a:
            raise cur.error(v.line, k, f"expected MIN-MAX with MIN <= MAX, got {shown(v.text)}")
        return replace(s, port_min=a, port_max=b)
    if k == "port_tries":  # the BPF search is compiled with this bound (SNAT_PORT_TRIES)
        return replace(s, port_tries=_int(cur, t, v, 1, PORT_TRIES_MAX))
    if k == "on_exhausted":
        return replace(s, on_exhausted=_choice(cur, t, v, ON_EXHAUSTED))
    if k == "refuse_icmp":
        return replace(s, refuse_icmp=_choice(cur, t, v, ("yes", "no")) == "yes")
    if k == "port_preserve":
        return replace(s, port_preserve=_choice(cur, t, v, ("yes", "no")) == "yes")
    if k == "max_sessions_per_host":
        return replace(s, max_sessions_per_host=_int(cur, t, v, 0, (1 << 32) - 1))
    if k == "max_sessions":
        return replace(s, max_sessions=_int(cur, t, v, 1, 1 << 31))
    if k == "unmatched":
        return replace(s, unmatched_drop=_choice(cur, t, v, ("pass", "drop")) == "drop")
    if k == "inbound":
        return replace(s, inbound_routed=_choice(cur, t, v, ("drop", "routed")) == "routed")
    if k == "backend":
        return replace(s, backend=_choice(cur, t, v, BACKENDS))
    if k == "timeout":  # an error names the state whose value is wrong: "timeout udp: expected seconds ..."
        if v.text not in TIMEOUT_NAMES:
            # a shortened name (tcp_est) is the one it begins, else the closest spelling
            close = [n for n in TIMEOUT_NAMES if n.startswith(v.text)] if _SHOWABLE.match(v.text) else []
            close = close if len(close) == 1 else difflib.get_close_matches(v.text, TIMEOUT_NAMES, 1, 0.6)
            raise cur.error(v.line, k, f"unknown state {shown(v.text)}; expected one of {', '.join(TIMEOUT_NAMES)}"
                                       + (f"; did you mean {close[0]!r}?" if close else ""))  # fmt: skip
        secs = args[1]
        if not _ASCII_INT.match(secs.text) or not 1 <= int(secs.text) <= 1 << 31:
            raise ConfigError(f"expected seconds, an integer 1..{1 << 31}, got {shown(secs.text)}",
                              f"timeout {v.text}", cur.where(secs.line))
        return s.with_timeouts(**{v.text: int(secs.text)})
    if k == "gc_interval":
        secs = _seconds(v.text)
        if not (math.isfinite(secs) and 0 < secs <= GC_INTERVAL_MAX):
            raise cur.error(v.line, k, f"expected seconds, a number > 0 and <= {GC_INTERVAL_MAX}, got {shown(v.text)}")
        return replace(s, gc_interval=secs)
    if k in ("sync_interval", "sync_refresh"):
        lo, hi = SYNC_INTERVAL_RANGE if k == "sync_interval" else SYNC_REFRESH_RANGE
        secs = _seconds(v.text)
        if not (math.isfinite(secs) and lo <= secs <= hi):
            raise cur.error(v.line, k, f"expected seconds, a number from {lo:g} to {hi:g}, got {shown(v.text)}")
        return replace(s, **{k: secs})
    if k == "control_socket":
        path = _path(cur, t, v)
        if len(path.encode()) > MAX_SOCKET_PATH:  # the daemon's bind would fail: "AF_UNIX path too long"
            raise cur.error(v.line, k, f"expected a path of at most {MAX_SOCKET_PATH} bytes (a unix socket's "
                                       f"limit), got one of {len(path.encode())}")
        return replace(s, control_socket=path)
    if k == "snat_addresses":
        return replace(s, snat_addresses=_choice(cur, t, v, SNAT_ADDRESS_MODES))
    if k == "allow_empty":
        return replace(s, allow_empty=_choice(cur, t, v, ("yes", "no")) == "yes")
    if k == "metrics_listen":
        try:
            parse_listen(v.text)
        except ValueError as e:
            raise cur.error(v.line, k, str(e)) from None
        return replace(s, metrics_listen=v.text)
    if k == "audit_log":
        if v.text == "syslog":
            return replace(s, audit_log="syslog")
        try:
            check_audit_path(_path(cur, t, v))
        except ValueError as e:
            raise cur.error(v.line, k, str(e)) from None
        return replace(s, audit_log=v.text)
    if k == "audit_log_max_size":
        try:
            return replace(s, audit_log_max_size=parse_size(v.text))
        except ValueError as e:
            raise cur.error(v.line, k, str(e)) from None
    if k == "audit_log_keep":
        return replace(s, audit_log_keep=_int(cur, t, v, 0, AUDIT_LOG_MAX_KEEP))
    if k == "rps_cpus":
        try:
            return replace(s, rps_cpus=parse_rps_cpus(v.text, online_here=cur.cpus_here))
        except ValueError as e:
            raise cur.error(v.line, k, str(e)) from None
    if k in ("sync_peer", "sync_local"):
        try:
            addr = parse_addr(v.text, k)
        except RuleError:
            raise cur.error(v.line, k, f"expected an IPv4 address A.B.C.D, got {shown(v.text)}") from None
        if addr.is_multicast or addr.is_unspecified or int(addr) == 0xFFFFFFFF:
            raise cur.error(v.line, k, f"expected a unicast address, got {shown(v.text)}")
        return replace(s, **{k: str(addr)})
    if k == "sync_port":
        return replace(s, sync_port=_int(cur, t, v, 1, 65535))
    if k == "sync_key":
        path = _path(cur, t, v)
        try:
            read_sync_key(path)
        except ValueError as e:
            raise cur.error(v.line, k, str(e)) from None
        return replace(s, sync_key=path)
    assert k == "pin_dir"
    return replace(s, pin_dir=_path(cur, t, v))


def parse_rps_cpus(text: str, online_here: bool = True) -> str:
    """``rps_cpus``: off, all, or a CPU list (kernel cpulist syntax, made canonical: "3,0-1" ->
    "0-1,3") of CPUs online now (``online_here``; not checked without it: rps_cpus_offline);
    ValueError saying what is wrong."""
    from ..daemon import rps

    if text in ("off", "all"):
        return text
    if not text[:1].isdigit() or not _SHOWABLE.match(text):  # (what is not config text is never quoted)
        raise ValueError(f"expected off, all or a CPU list such as 0-3,6, got {shown(text)}")
    cpus = rps.parse_cpulist(text)
    if online_here:
        off = rps_cpus_offline(text)
        if off:
            raise ValueError(off)
    return rps.format_cpulist(cpus)


def rps_cpus_offline(text: str, where: str = "") -> str | None:
    """Why the CPU list ``text`` (valid: parse_rps_cpus) names CPUs that are not online on this
    machine, or cannot be checked here; None when all are (and for off and all).  ``where``:
    words after "not online" ("on this machine")."""
    from ..daemon import rps

    if text in ("off", "all"):
        return None
    cpus = rps.parse_cpulist(text)
    try:
        online = rps.online_cpus()
    except (OSError, ValueError) as e:
        return f"cannot read the online CPUs to check {shown(text)}: {e}"
    off = cpus - online
    if off:
        return (f"CPU {rps.format_cpulist(off)} of {shown(text)} {'is' if len(off) == 1 else 'are'} "
                f"not online{' ' + where if where else ''} (online: {rps.format_cpulist(online)})")
    return None


_SIZE = re.compile(r"([0-9]{1,15})([KMG]?)\Z")
AUDIT_MIN_SIZE = 4096  # smallest audit_log_max_size (a few lines)


def parse_size(text: str) -> int:
    """``audit_log_max_size``: bytes, or a number with K, M or G (1024-based); >= 4096."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"expected a size in bytes, or with K, M or G (e.g. 100M), got {shown(text)}")
    n = int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
    if not AUDIT_MIN_SIZE <= n <= 1 << 50:
        raise ValueError(f"expected at least {AUDIT_MIN_SIZE} bytes, got {shown(text)}")
    return n


#: statfs(2) magic numbers of the kernel's pseudo file systems: their "files" are the kernel's
#: views (/proc/version is a regular file there), never a log the daemon can create and append to
PSEUDO_FS = {0x9FA0: "proc", 0x62656572: "sysfs", 0x27E0EB: "cgroup", 0x63677270: "cgroup2", 0xCAFE4A11: "bpf",
             0x64626720: "debugfs", 0x74726163: "tracefs", 0x73636673: "securityfs", 0x6165676C: "pstore",
             0x62656570: "configfs", 0xDE5E81E4: "efivarfs", 0xF97CFF8C: "selinuxfs", 0x1CD1: "devpts",
             0x19800202: "mqueue", 0x65735543: "fusectl", 0x6E736673: "nsfs", 0x42494E4D: "binfmt_misc"}


def fs_magic(path: str) -> int | None:
    """statfs(2)'s f_type of the file system holding ``path`` (None when it cannot be had)."""
    import ctypes

    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first word
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.statfs(os.fsencode(path), buf) != 0:
            return None
    except (OSError, AttributeError, ValueError):
        return None
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


def check_audit_path(path: str) -> None:
    """An audit log file the daemon can create and append to: its directory exists (and is a
    directory, not writable by others unless sticky) on a file system that holds files (not
    /proc, /sys, a bpffs ...), the path is not a directory or something other than a regular
    file, not owned by another user than root (or whoever checks), and (as whoever checks) is
    writable.  ValueError saying what is wrong."""
    d = os.path.dirname(path) or "/"
    try:
        st = os.stat(d)
    except OSError as e:
        raise ValueError(f"directory {d} of {path}: {e.strerror} (create it first)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{d} (the directory of {path}) is not a directory")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise ValueError(f"{d} (the directory of {path}) is writable by others (mode {stat.S_IMODE(st.st_mode):04o}) "
                         "without the sticky bit: anyone could replace the log or its rotated files; "
                         "chmod o-w it, or use /var/log/snatgw")
    for at in (path, d) if os.path.lexists(path) else (d,):
        fs = PSEUDO_FS.get(fs_magic(at))
        if fs:
            raise ValueError(f"{path} is on the kernel's {fs} file system, where no log file can be created or "
                             "appended to; name a file on a disk, e.g. /var/log/snatgw/audit.jsonl")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink"),
                                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
                     if test(st.st_mode)), "not a regular file")  # fmt: skip
        raise ValueError(f"{path} exists and is {kind}; the audit log is a regular file the daemon creates and "
                         "appends to")
    if st is not None and st.st_uid not in (0, os.geteuid()):
        raise ValueError(f"{path} is owned by uid {st.st_uid}, not by root: its owner reads every record (who used "
                         "which address and port when) and may truncate it; remove it or chown it to root")
    if not os.access(path if st is not None else d, os.W_OK):
        raise ValueError(f"{path if st is not None else d} is not writable (as uid {os.geteuid()})")


def parse_listen(text: str) -> tuple[str, int]:
    """``metrics_listen``'s ``ADDR:PORT`` -> (addr, port); ValueError saying what is wrong."""
    host, sep, port = text.rpartition(":")
    # the port in ASCII digits: str.isdigit() is true for '٩٠٠٠' (int() reads 9000) and '²'
    if not sep or not _ASCII_INT.match(port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected ADDR:PORT with a port 1..65535, got {shown(text)}")
    if _quad_ok(host) is False:
        raise ValueError(f"expected an IPv4 address A.B.C.D before ':', got {shown(host) if host else 'nothing'}")
    return host, int(port)


def _quad_ok(host: str) -> bool:
    try:
        parse_addr(host, "metrics_listen")
        return True
    except RuleError:
        return False


# --------------------------------------------------------------------------- output


def settings_as_dict(s: Settings) -> dict:
    """Settings as plain JSON values, timeouts by keyword name."""
    return {
        "inside": list(s.inside),
        "outside": list(s.outside),
        "port_range": f"{s.port_min}-{s.port_max}",
        "port_tries": s.port_tries,
        "max_sessions": s.max_sessions,
        "on_exhausted": s.on_exhausted,
        "max_sessions_per_host": s.max_sessions_per_host,
        "refuse_icmp": "yes" if s.refuse_icmp else "no",
        "port_preserve": "yes" if s.port_preserve else "no",
        "unmatched": "drop" if s.unmatched_drop else "pass",
        "inbound": "routed" if s.inbound_routed else "drop",
        "backend": s.backend,
        "timeout": {TIMEOUT_BY_STATE[st]: secs for st, secs in s.timeouts},
        "gc_interval": s.gc_interval,
        "control_socket": s.control_socket,
        "pin_dir": s.pin_dir,
        "snat_addresses": s.snat_addresses,
        "allow_empty": "yes" if s.allow_empty else "no",
        "metrics_listen": s.metrics_listen,
        "audit_log": s.audit_log,
        "audit_log_max_size": s.audit_log_max_size,
        "audit_log_keep": s.audit_log_keep,
        "rps_cpus": s.rps_cpus,
        "sync_peer": s.sync_peer,
        "sync_local": s.sync_local,
        "sync_port": s.sync_port,
        "sync_key": s.sync_key,
        "sync_interval": s.sync_interval,
        "sync_refresh": s.sync_refresh,
    }


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def render_settings(s: Settings, full: bool = False) -> list[str]:
    """`snatgw { }` body lines: only what differs from the defaults unless ``full``."""
    d, base = settings_as_dict(s), settings_as_dict(Settings())
    lines = []
    for k in SETTINGS_KEYWORDS:
        if k == "timeout":
            for name, secs in d["timeout"].items():
                if full or base["timeout"].get(name) != secs:
                    lines.append(f"timeout {name} {secs}")
            continue
        if (not full and d[k] == base[k]) or d[k] is None:
            continue
        if k.startswith("sync_") and s.sync_peer is None:
            continue  # (sync_port alone is an error)
        if k in ("inside", "outside"):
            if d[k]:
                lines.append(f"{k} {' '.join(d[k])}")
        elif k in ("gc_interval", "sync_interval", "sync_refresh"):
            lines.append(f"{k} {_fmt_num(d[k])}")
        else:
            lines.append(f"{k} {d[k]}")
    return lines


def render_rule(r: Rule) -> str:
    """One `snat_rule { ... }` line, every keyword the rule sets (`to` only when not 0/0)."""
    d = r.as_dict()
    parts = [f"from {d['from']}"]
    if r.dst != ANY_NET:
        parts.append(f"to {d['to']}")
    for k in ("gw", "oif", "new_gw"):
        if d[k]:
            parts.append(f"{k} {d[k]}")
    parts += [f"snat_ip {r.pool.short()}", f"algo {d['algo']}"]
    if r.on_exhausted:
        parts.append(f"on_exhausted {r.on_exhausted}")
    if r.max_sessions_per_host is not None:
        parts.append(f"max_sessions_per_host {r.max_sessions_per_host}")
    for k in ("mapping", "filtering", "port_preserve"):
        if k in d:
            parts.append(f"{k} {d[k]}")
    return "snat_rule { " + "  ".join(parts) + " }"


def render_config(cfg: GatewayConfig, full_settings: bool = False) -> str:
    """Config text that parses back to the same rules (definition order) and settings."""
    out = []
    body = render_settings(cfg.settings, full_settings)
    if body:
        out += ["snatgw {"] + [f"    {line}" for line in body] + ["}", ""]
    out.append("virtual_server fwmark 1 {")
    out += [f"    {render_rule(r)}" for r in cfg.rules.defined]
    out.append("}")
    for lk in cfg.links:
        out += ["", render_link(lk)]
    return "\n".join(out) + "\n"


def render_link(lk: Link) -> str:
    """A `link NAME { ... }` block with every keyword it sets."""
    d = lk.as_dict()
    lines = [f"link {lk.name} {{", f"    gw {d['gw']}"]
    if lk.oif:
        lines.append(f"    oif {lk.oif}")
    lines.append(f"    probe {' '.join(d['probe'])}")
    if lk.source:
        lines.append(f"    source {d['source']}")
    lines.append(f"    interval {_fmt_num(lk.interval)}  fall {lk.fall}  rise {lk.rise}  hold {_fmt_num(lk.hold)}")
    lines.append(f"    backup_gw {d['backup_gw']}")
    if lk.backup_pool:
        lines.append(f"    backup_snat_ip {lk.backup_pool.short()}")
    return "\n".join(lines + ["}"])


__all__ = [
    "parse_text", "parse_file", "render_config", "render_rule", "render_settings", "render_link",
    "settings_as_dict", "tokenize", "read_config", "require_rules", "shown", "MAX_CONFIG_BYTES",
    "RULE_KEYWORDS", "SETTINGS_KEYWORDS",
]  # fmt: skip
