"""Output helpers for CLI verbs: aligned text tables, JSON, and the rule table every verb shows.

Pure functions returning strings; verbs print them.  Import freely from any verb.
"""

from __future__ import annotations

import json
from typing import Iterable, Sequence

from ..rules import Rule

#: columns of the rule table, in order (`check`, `explain`, listings)
RULE_COLUMNS = ("#", "from", "to", "gw", "oif", "new_gw", "snat_ip", "algo", "defined at")


def cell(v) -> str:
    """A table cell: None and empty values print as '-'."""
    if v is None or v == "" or v == () or v == []:
        return "-"
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return str(v)


def table(rows: Iterable[Sequence], headers: Sequence[str] | None = None, indent: str = "") -> str:
    """Left-aligned columns separated by two spaces; no trailing blanks."""
    body = [[cell(c) for c in r] for r in rows]
    allrows = ([list(headers)] if headers else []) + body
    if not allrows:
        return ""
    width = [max(len(r[i]) for r in allrows if i < len(r)) for i in range(max(len(r) for r in allrows))]
    lines = []
    for r in allrows:
        line = "  ".join(c.ljust(width[i]) for i, c in enumerate(r))
        lines.append(indent + line.rstrip())
    return "\n".join(lines)


def rule_row(index: int, rule: Rule) -> list:
    """One row of RULE_COLUMNS."""
    d = rule.as_dict()
    return [index, d["from"], d["to"], d["gw"], d["oif"], d["new_gw"], d["snat_ip"], d["algo"], rule.where]


def rule_table(rules: Iterable[Rule], indent: str = "") -> str:
    """Rules in the order given (pass a RuleSet for priority order), numbered from 1."""
    return table((rule_row(i, r) for i, r in enumerate(rules, 1)), RULE_COLUMNS, indent)


def rule_json(index: int, rule: Rule) -> dict:
    """A rule as JSON: priority, the rule's fields (Rule.as_dict), id and where it was defined."""
    return {"priority": index, **rule.as_dict(), "rule_id": rule.rule_id, "where": rule.where}


def dump_json(obj) -> str:
    """Stable, readable JSON (keys in insertion order, 2-space indent)."""
    return json.dumps(obj, indent=2, ensure_ascii=False, default=str)


def kv_table(pairs: Iterable[tuple[str, object]], indent: str = "  ") -> str:
    """`name  value` lines, names aligned."""
    return table(([k, v] for k, v in pairs), None, indent)
