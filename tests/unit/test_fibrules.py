"""fibrules.route_back_blocker: whether a FIB lookup's answer depends on its input device (so
whether a new session's route back may be the reverse-path check's), rules in, answer out."""

from snatgw.fibrules import PolicyRule, describe, route_back_blocker

from tests.unit.daemon_fakes import Loop, Worker

DEFAULT = [PolicyRule(0, table=255), PolicyRule(32766, table=254), PolicyRule(32767, table=253)]
FWD = {"lo": True, "eth1": True, "lan40": True}


def test_the_default_rules_with_forwarding_everywhere_let_the_route_back_be_reused():
    assert route_back_blocker(DEFAULT, FWD) is None
    assert route_back_blocker([], {}) is None
    assert describe(None) == "reused from the reverse-path check"


def test_rules_that_select_on_other_things_do_not_matter():
    """oif (unset in both lookups), from/to, fwmark, tables: not the input device."""
    rules = DEFAULT + [PolicyRule(100, table=100), PolicyRule(200, table=200, invert=True)]
    assert route_back_blocker(rules, FWD) is None


def test_an_iif_rule_makes_it_looked_up_and_is_named():
    rules = DEFAULT + [PolicyRule(100, iif="eth1", table=100)]
    why = route_back_blocker(rules, FWD)
    assert why == "iif rule 100: from all iif eth1 lookup 100"
    assert describe(why) == "looked up per session (iif rule 100: from all iif eth1 lookup 100)"


def test_not_iif_lo_and_iif_of_an_absent_device_count_too():
    """`not iif lo` tells the reverse-path check (from lo) from the route back; a rule naming a
    device not there yet selects on it as soon as the device comes."""
    assert route_back_blocker(DEFAULT + [PolicyRule(101, iif="lo", invert=True, table=101)], FWD) == \
        "iif rule 101: not from all iif lo lookup 101"
    assert route_back_blocker(DEFAULT + [PolicyRule(5, iif="eth9", table=7)], FWD).startswith("iif rule 5:")


def test_the_l3mdev_rule_of_a_vrf_counts():
    assert route_back_blocker(DEFAULT + [PolicyRule(1000, l3mdev=True, table=0)], FWD) == \
        "l3mdev rule 1000: from all lookup [l3mdev-table]"


def test_the_first_blocker_by_priority_is_named():
    rules = [PolicyRule(300, iif="b", table=3), PolicyRule(100, l3mdev=True), PolicyRule(200, iif="a", table=2)]
    assert route_back_blocker(rules, FWD).startswith("l3mdev rule 100")


def test_a_device_with_forwarding_off_makes_it_looked_up():
    """Off on the uplink, the route back's lookup fails (FWD_DISABLED) where the reverse-path
    check's succeeds: not the same answer."""
    assert route_back_blocker(DEFAULT, {**FWD, "eth2": False}) == "forwarding off on eth2"
    assert route_back_blocker(DEFAULT + [PolicyRule(9, iif="x")], {"eth2": False}).startswith("iif rule")


def test_rule_events_judge_again_one_job_at_a_time():
    """The daemon's extras: a burst of IPv4 rule events while a judgement runs makes one more
    judgement after it (it may have read the old rules), never a queue of them."""
    from snatgw.daemon.extras import Extras
    from snatgw.daemon.log import Log

    class Service:
        judged = 0

        def refresh_route_back(self):
            Service.judged += 1

    w = Worker()
    ex = Extras(Service(), loop=None, worker=w, log=Log())
    for _ in range(5):  # a burst: one job, one more owed
        ex._judge_route_back()
    assert len(w.jobs) == 1
    fn, done = w.jobs.pop()
    done(fn(), None)
    assert len(w.jobs) == 1  # the one owed
    ex._judge_route_back()  # while it runs: owed again
    fn, done = w.jobs.pop()
    done(fn(), None)
    fn, done = w.jobs.pop()
    done(fn(), None)
    assert w.jobs == [] and Service.judged == 3


def test_attach_judges_again_once_the_socket_listens(monkeypatch):
    """The daemon judges the route back in its backend's start, then opens its netlink socket
    (Extras.attach): a rule added between the two sends no event the daemon hears.  So attach
    judges once more after the socket listens (the 10 s re-check at the hook check would be
    the first to see the rule otherwise)."""
    from snatgw.daemon.extras import Extras
    from snatgw.daemon.log import Log

    class Service:
        judged = 0

        def refresh_route_back(self):
            Service.judged += 1

    monkeypatch.setattr(Extras, "refresh", lambda self: None)  # no links, no metrics listener
    w, loop = Worker(), Loop()
    ex = Extras(Service(), loop=loop, worker=w, log=Log())
    ex.attach()
    try:
        assert ex.netlink is not None and ex.netlink in loop.readers
        assert len(w.jobs) == 1
        fn, done = w.jobs.pop()
        done(fn(), None)
        assert Service.judged == 1 and w.jobs == []
    finally:
        ex.close()
