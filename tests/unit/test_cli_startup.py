"""Every `snatgw` verb pays for the imports the parser tree needs; the daemon's metrics server
(prometheus_client) is the daemon's alone, so `snatgw stats` at a million sessions stays a
millisecond answer plus a short start-up (issue 14: stats under 1 s)."""

import subprocess
import sys


def test_building_the_cli_does_not_import_the_metrics_server():
    code = ("import sys; from snatgw.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith(('prometheus_client', 'snatgw.daemon.metrics'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_verb_imports_its_own_module_only():
    """`snatgw stats` (a monitoring probe's command) builds its own parser: no other verb's
    module, no daemon, bench, lab, nft renderer or config parser is imported for it."""
    code = ("import sys; from snatgw.cli.main import main\n"
            "try:\n    main(['stats', '--socket', '/nonexistent/snatgw.sock'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('snatgw.cli.commands.', 'snatgw.daemon.main', "
            "'snatgw.daemon.service', 'snatgw.bench', 'snatgw.lab', 'snatgw.datapath', 'snatgw.config.parse'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "['snatgw.cli.commands.stats']"
