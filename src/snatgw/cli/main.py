"""The `snatgw` command: a table of verbs, one module each under snatgw.cli.commands.

Each verb module defines ``HELP`` (one line), ``register(parser)`` to add its arguments, and
``run(args) -> int``.  Errors derived from SnatgwError are printed once, here, and mapped to
their exit code (snatgw.errors).
"""

from __future__ import annotations

import importlib
import os
import sys

from ..errors import EXIT_DAEMON, SnatgwError

TYPE_CHECKING = False  # typing's, without importing typing (~15 ms): `snatgw run` takes its signals first
if TYPE_CHECKING:
    import argparse

#: verb -> module under snatgw.cli.commands, in the order `snatgw --help` lists them
VERBS = {
    "check": "check",
    "explain": "explain",
    "run": "run",
    "purge": "purge",
    "reload": "reload",
    "status": "status",
    "conns": "conns",
    "stats": "stats",
    "flush": "flush",
    "adm": "adm",
    "export": "export",
    "import-iptables": "import_iptables",
    "lab": "lab",
    "demo": "demo",
    "bench": "bench",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line (help, man page, completion), or with ``only`` a verb's parser
    alone: a command imports its own module and no other verb's (`snatgw stats` does not pay
    for the daemon, the bench or the lab: start-up is most of a monitoring probe's time)."""
    import argparse  # here, not at the top: `snatgw run` takes its signals before this import

    parser = argparse.ArgumentParser(prog="snatgw", description="multi-ISP source-NAT gateway")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"snatgw {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, modname in VERBS.items():
        if only is not None and verb != only:
            continue
        try:
            mod = importlib.import_module(f".commands.{modname}", __package__)
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.commands.{modname}":
                continue  # verb not built yet
            raise
        p = sub.add_parser(verb, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           add_help=getattr(mod, "ADD_HELP", True))
        mod.register(p)
        p.set_defaults(_run=mod.run)
    return parser


#: what reading an answer of unexpected form raises (a field missing, a string for a list)
_ANSWER_ERRORS = (KeyError, TypeError, AttributeError, ValueError, IndexError)


def unreadable_answer(verb: str, e: Exception) -> int | None:
    """When a daemon answered this command and reading its answer failed: one line naming the
    socket and what was wrong, exit 4 (the daemon's answer was not usable), instead of a
    traceback; None when no daemon answered (the error is ours: raised as it is)."""
    from ..daemon.control import ANSWERED

    if not ANSWERED:
        return None
    what = f"{type(e).__name__}: {e}"[:200]
    print(f"snatgw {verb}: the daemon on {ANSWERED[-1]} answered in a form this snatgw cannot read ({what}): "
          "another snatgw version's (one running on since an upgrade: restart it), or no snatgw daemon",
          file=sys.stderr)
    return EXIT_DAEMON


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    control = sys.modules.get("snatgw.daemon.control")  # (not imported here: `run` takes its signals first)
    if control is not None:
        control.ANSWERED.clear()  # this command's answers only (tests call main() again and again)
    if argv and argv[0] in ("run", "demo"):  # before their imports (~0.15 s): a SIGTERM then is handled
        from ..daemon import startsignals

        startsignals.hold(startsignals.HELD if argv[0] == "run" else startsignals.STOP)
    # `snatgw adm` takes ipvsadm's own flags verbatim: hand them over untouched.
    if argv and argv[0] == "adm":
        from .commands import adm

        try:
            return adm.main(argv[1:])
        except SnatgwError as e:
            print(f"snatgw adm: {e}", file=sys.stderr)
            return e.exit_code
        except BrokenPipeError:  # as below: the reader closed the pipe; silence the exit flush
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except _ANSWER_ERRORS as e:
            rc = unreadable_answer("adm", e)
            if rc is None:
                raise
            return rc
    parser = build_parser(argv[0] if argv and argv[0] in VERBS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except SnatgwError as e:
        print(f"snatgw {args.verb}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # output piped into `head` and closed: not an error of ours; silence the flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except _ANSWER_ERRORS as e:
        rc = unreadable_answer(args.verb, e)
        if rc is None:
            raise
        return rc


if __name__ == "__main__":
    sys.exit(main())
