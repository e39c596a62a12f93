"""Model tests (no root): make tests/ importable (the shared corpus is ``cases``) and give a
fresh REF engine."""

import sys
from pathlib import Path

import pytest

TESTS = str(Path(__file__).resolve().parents[1])
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from cases.corpus import REF_RULES, REF_SETTINGS, ruleset  # noqa: E402

from snatgw.model import Engine, StaticRouter  # noqa: E402


@pytest.fixture
def engine():
    return Engine(ruleset(REF_RULES), REF_SETTINGS, StaticRouter.ref())
