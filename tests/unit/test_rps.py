"""`rps_cpus` (daemon/rps.py): the setting's parse and its errors, the masks as the kernel prints
them, the decisions of what to write and put back, and the writer on a fake sysfs: what it
writes, what it puts back, and that it writes nothing where /sys is another namespace's."""

from __future__ import annotations

import json
import os

import pytest

from snatgw.config.parse import parse_text, render_config
from snatgw.daemon import rps
from snatgw.daemon.rps import DeviceNow, RpsManager, Saved, decide, format_mask, parse_mask
from snatgw.errors import ConfigError

RULES = "virtual_server fwmark 1 {\n snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71 }\n}\n"


@pytest.fixture(autouse=True)
def two_cpus(monkeypatch):
    """CPUs 0 and 1 online, whatever machine runs the tests."""
    monkeypatch.setattr(rps, "online_cpus", lambda sysfs=rps.SYSFS: frozenset({0, 1}))


def conf(value: str) -> str:
    return f"snatgw {{\n    inside in0\n    rps_cpus {value}\n}}\n" + RULES


def err(value: str) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_text(conf(value), "t.conf", [])
    return str(ei.value)


# --------------------------------------------------------------------------- the setting


@pytest.mark.parametrize("value, canonical", [("off", "off"), ("all", "all"), ("0", "0"), ("1,0", "0-1"),
                                              ("0-1", "0-1"), ("1", "1")])
def test_rps_cpus_values_parse_and_render_back(value, canonical):
    """off, all and a CPU list (made canonical) parse, and the rendered config parses back the same."""
    cfg = parse_text(conf(value), "t.conf", [])
    assert cfg.settings.rps_cpus == canonical
    assert parse_text(render_config(cfg), "r.conf", []).settings == cfg.settings
    assert ("rps_cpus" in render_config(cfg)) == (canonical != "off")


def test_rps_cpus_default_is_off():
    assert parse_text(RULES, "t.conf", []).settings.rps_cpus == "off"


@pytest.mark.parametrize("value, message", [
    ("some", "t.conf:3: rps_cpus: expected off, all or a CPU list such as 0-3,6, got 'some'"),
    ("2", "t.conf:3: rps_cpus: CPU 2 of '2' is not online (online: 0-1)"),
    ("0-3", "t.conf:3: rps_cpus: CPU 2-3 of '0-3' are not online (online: 0-1)"),
    ("3-1", "t.conf:3: rps_cpus: expected a range LOW-HIGH with LOW <= HIGH, got '3-1'"),
    ("0,,1", "t.conf:3: rps_cpus: expected a CPU list such as 0-3,6, got an empty item in '0,,1'"),
    ("0,", "t.conf:3: rps_cpus: expected a CPU list such as 0-3,6, got an empty item in '0,'"),
    ("4096", "t.conf:3: rps_cpus: CPU 4096: CPU numbers go from 0 to 4095"),
    ("0-99999", "t.conf:3: rps_cpus: CPU 99999: CPU numbers go from 0 to 4095"),
    ("0-x", "t.conf:3: rps_cpus: expected a CPU number or a range LOW-HIGH, got '0-x'"),
    ("ALL", "t.conf:3: rps_cpus: expected off, all or a CPU list such as 0-3,6, got 'ALL'"),
    ("0-1" + "x" * 70, "t.conf:3: rps_cpus: expected off, all or a CPU list such as 0-3,6, got a word of 73 "
                       "characters that is not config text (not shown)"),
])
def test_rps_cpus_bad_input_names_file_line_field_and_what_was_expected(value, message):
    assert err(value) == message


def test_check_warns_of_cpus_not_online_here_and_run_and_reload_refuse_them(tmp_path, capsys):
    """`snatgw check` is often run on another machine (CI, a laptop) than the gateway: CPUs
    not online there are a warning naming which and why, and the file passes; the daemon's
    parse (`run`, a reload: load_config) still refuses them with file, line and field.  Until
    30 Nov 2026 check refused a file meant for a gateway with more CPUs than the checker."""
    from snatgw.cli.main import main
    from snatgw.daemon.service import load_config

    path = tmp_path / "c.conf"
    path.write_text(conf("0-3"))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}:3: rps_cpus: CPU 2-3 of '0-3' are not online on this machine (online: 0-1)" in out
    assert "`snatgw run` and a reload refuse them where they are not online" in out
    assert "rps_cpus          0-3" in out or "rps_cpus 0-3" in " ".join(out.split())
    with pytest.raises(ConfigError) as ei:
        load_config(str(path))
    assert str(ei.value) == f"{path}:3: rps_cpus: CPU 2-3 of '0-3' are not online (online: 0-1)"
    with pytest.raises(ConfigError) as ei:
        load_config(text=conf("0-3"), filename="<control>")
    assert str(ei.value) == "<control>:3: rps_cpus: CPU 2-3 of '0-3' are not online (online: 0-1)"


@pytest.mark.parametrize("value, message", [
    ("3-1", "rps_cpus: expected a range LOW-HIGH with LOW <= HIGH, got '3-1'"),
    ("4096", "rps_cpus: CPU 4096: CPU numbers go from 0 to 4095"),
    ("some", "rps_cpus: expected off, all or a CPU list such as 0-3,6, got 'some'"),
])
def test_check_still_refuses_a_cpu_list_that_is_wrong_anywhere(value, message, tmp_path, capsys):
    path = tmp_path / "c.conf"
    path.write_text(conf(value))
    with pytest.raises(ConfigError) as ei:
        main_check(str(path))
    assert str(ei.value) == f"{path}:3: {message}"


def main_check(path: str) -> int:
    from snatgw.cli.commands import check

    return check.run(check.argparse.Namespace(file=path, json=False))


def test_rps_cpus_without_a_value_is_an_error():
    with pytest.raises(ConfigError) as ei:
        parse_text("snatgw {\n    rps_cpus\n}\n" + RULES, "t.conf", [])
    assert str(ei.value) == "t.conf:2: rps_cpus: expected a value on the same line, got 0 words"


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("cpus, nbits, text", [
    ({0}, 1, "1"),
    ({0, 1}, 2, "3"),
    ({1}, 2, "2"),
    (set(range(33)), 33, "1,ffffffff"),
    ({0}, 33, "0,00000001"),
    ({32}, 33, "1,00000000"),
    (set(range(64)), 64, "ffffffff,ffffffff"),
    ({0, 63}, 64, "80000000,00000001"),
    ({0}, 8, "01"),  # the kernel pads to the digits nr_cpu_ids needs
])
def test_masks_are_formatted_as_the_kernel_prints_them(cpus, nbits, text):
    assert format_mask(cpus, nbits) == text
    assert rps.mask_cpus(parse_mask(text)) == frozenset(cpus)


def test_cpulists_format_canonically():
    assert rps.format_cpulist({0, 1, 2, 3, 6}) == "0-3,6"
    assert rps.format_cpulist({5}) == "5"
    assert rps.parse_cpulist("0-3,6") == frozenset({0, 1, 2, 3, 6})


# --------------------------------------------------------------------------- decisions


def test_decide_writes_the_mask_and_saves_what_each_queue_had():
    now = {"in0": DeviceNow(5, {"rx-0": "1", "rx-1": "0"}), "up0": DeviceNow(6, {"rx-0": "3"})}
    plan = decide("3", ("in0", "up0"), now, {})
    assert plan.writes == [("in0", "rx-0", "3"), ("in0", "rx-1", "3")]  # up0 has it already
    assert plan.saved == {"in0": Saved(5, {"rx-0": "1", "rx-1": "0"}), "up0": Saved(6, {"rx-0": "3"})}


def test_decide_off_puts_back_what_was_saved_and_forgets_it():
    saved = {"in0": Saved(5, {"rx-0": "1"})}
    plan = decide(None, ("in0",), {"in0": DeviceNow(5, {"rx-0": "3"})}, saved)
    assert plan.writes == [("in0", "rx-0", "1")] and plan.saved == {}


def test_decide_a_changed_mask_keeps_the_first_saved_masks():
    """A reload from all to CPU 1: the new mask is written; what is put back at the end is what
    the device had before the daemon, not the daemon's first mask."""
    saved = {"in0": Saved(5, {"rx-0": "1"})}
    plan = decide("2", ("in0",), {"in0": DeviceNow(5, {"rx-0": "3"})}, saved)
    assert plan.writes == [("in0", "rx-0", "2")] and plan.saved == saved


def test_decide_a_device_that_left_the_config_gets_its_masks_back():
    saved = {"in0": Saved(5, {"rx-0": "1"}), "in1": Saved(7, {"rx-0": "0"})}
    now = {"in0": DeviceNow(5, {"rx-0": "3"}), "in1": DeviceNow(7, {"rx-0": "3"})}
    plan = decide("3", ("in0",), now, saved)
    assert plan.writes == [("in1", "rx-0", "0")] and set(plan.saved) == {"in0"}


def test_decide_gone_or_recreated_devices_have_nothing_put_back():
    """A device removed meanwhile is not an error; a recreated one (another ifindex) is a new
    device: its own masks are what is saved, and it gets the mask."""
    saved = {"in0": Saved(5, {"rx-0": "1"}), "in1": Saved(7, {"rx-0": "1"})}
    now = {"in0": None, "in1": DeviceNow(9, {"rx-0": "0"})}
    assert decide(None, ("in0", "in1"), now, saved).writes == []
    plan = decide("3", ("in0", "in1"), now, saved)
    assert plan.writes == [("in1", "rx-0", "3")]
    assert plan.saved == {"in0": Saved(5, {"rx-0": "1"}), "in1": Saved(9, {"rx-0": "0"})}


def test_decide_compares_masks_by_value():
    """The kernel prints "00000003" or "0,00000003" on wider machines: the same mask as "3"."""
    plan = decide("3", ("in0",), {"in0": DeviceNow(5, {"rx-0": "0,00000003"})}, {})
    assert plan.writes == []


# --------------------------------------------------------------------------- the writer, on a fake sysfs


class FakeNet:
    """A sysfs tree in a tmpdir: class/net/<dev>/{ifindex,queues/rx-N/rps_cpus}, and the CPUs;
    ``links`` is this namespace as netlink would list it."""

    def __init__(self, root, devices: dict[str, tuple[int, int]]):
        self.root = str(root)
        os.makedirs(os.path.join(self.root, "devices/system/cpu"))
        for f in ("online", "possible"):
            with open(os.path.join(self.root, "devices/system/cpu", f), "w") as fh:
                fh.write("0-1\n")
        self.links = {}
        for name, (idx, nq) in devices.items():
            self.add(name, idx, nq)

    def add(self, name: str, idx: int, nq: int = 1, mask: str = "0") -> None:
        d = os.path.join(self.root, "class/net", name)
        os.makedirs(os.path.join(d, "queues", "tx-0"), exist_ok=True)
        with open(os.path.join(d, "ifindex"), "w") as f:
            f.write(f"{idx}\n")
        for q in range(nq):
            os.makedirs(os.path.join(d, "queues", f"rx-{q}"), exist_ok=True)
            with open(os.path.join(d, "queues", f"rx-{q}", "rps_cpus"), "w") as f:
                f.write(mask + "\n")
        self.links[name] = idx

    def mask(self, name: str, q: int = 0) -> str:
        with open(os.path.join(self.root, "class/net", name, "queues", f"rx-{q}", "rps_cpus")) as f:
            return f.read().strip()

    def set(self, name: str, mask: str, q: int = 0) -> None:
        with open(os.path.join(self.root, "class/net", name, "queues", f"rx-{q}", "rps_cpus"), "w") as f:
            f.write(mask + "\n")

    def manager(self, log=None, links=None, state=None) -> RpsManager:
        def nametoindex(n):
            if n not in (links if links is not None else self.links):
                raise OSError(19, "No such device")
            return (links if links is not None else self.links)[n]

        return RpsManager(log, sysfs=self.root,
                          nameindex=lambda: [(i, n) for n, i in (links if links is not None else self.links).items()],
                          nametoindex=nametoindex, state=state)


class Settings:
    def __init__(self, rps_cpus="all", inside=("in0",), outside=("up0",)):
        self.rps_cpus, self.inside, self.outside = rps_cpus, inside, outside


class RecLog:
    def __init__(self):
        self.lines = []

    def info(self, event, **f):
        self.lines.append(("info", event, f))

    def warning(self, event, **f):
        self.lines.append(("warning", event, f))


def test_manager_writes_every_rx_queue_and_puts_back_the_masks_before(tmp_path):
    net = FakeNet(tmp_path, {"lo": (1, 1), "in0": (5, 2), "up0": (6, 1)})
    net.set("in0", "2", 1)  # a distinct non-zero mask before: restore is not "reset to 0"
    m = net.manager()
    m.sync(Settings("all"))
    assert (net.mask("in0", 0), net.mask("in0", 1), net.mask("up0"), net.mask("lo")) == ("3", "3", "3", "0")
    st = m.as_dict()
    assert st["mask"] == "3" and st["refused"] is None
    assert st["devices"]["in0"] == {"queues": {"rx-0": "3", "rx-1": "3"}, "previous": {"rx-0": "0", "rx-1": "2"},
                                    "error": None}
    m.sync(Settings("1"))  # a reload changing it
    assert (net.mask("in0", 0), net.mask("in0", 1)) == ("2", "2")
    m.restore()
    assert (net.mask("in0", 0), net.mask("in0", 1), net.mask("up0")) == ("0", "2", "0")


def test_manager_off_reads_and_writes_nothing(tmp_path):
    net = FakeNet(tmp_path, {"lo": (1, 1), "in0": (5, 1), "up0": (6, 1)})
    net.set("in0", "1")
    m = net.manager(links={"bogus": 1})  # would be refused as foreign: off never looks
    m.sync(Settings("off"))
    m.restore()
    assert net.mask("in0") == "1" and m.as_dict() == {"setting": "off", "mask": None, "note": None,
                                                       "refused": None, "devices": {}, "state": None,
                                                       "state_error": None}


def test_manager_reload_to_off_and_device_leaving_put_back(tmp_path):
    net = FakeNet(tmp_path, {"lo": (1, 1), "in0": (5, 1), "in1": (7, 1), "up0": (6, 1)})
    net.set("in1", "1")
    m = net.manager()
    m.sync(Settings("all", inside=("in0", "in1")))
    assert net.mask("in1") == "3"
    m.sync(Settings("all", inside=("in0",)))  # in1 left the config
    assert (net.mask("in1"), net.mask("in0")) == ("1", "3")
    m.sync(Settings("off"))
    assert (net.mask("in0"), net.mask("up0")) == ("0", "0") and m.saved == {}


def test_manager_hook_check_gives_a_recreated_device_the_mask_and_logs_it(tmp_path):
    net = FakeNet(tmp_path, {"lo": (1, 1), "in0": (5, 1), "up0": (6, 1)})
    log = RecLog()
    m = net.manager(log)
    m.sync(Settings("all"))
    assert m.check() == []  # nothing changed: nothing read
    net.add("in0", 9)  # recreated: a new ifindex, the kernel's default mask
    assert net.mask("in0") == "0"
    events = m.check()
    assert net.mask("in0") == "3"
    assert any("recreated (ifindex 5 -> 9)" in e for e in events)
    assert ("info", "rps_cpus", {"change": "in0: recreated (ifindex 5 -> 9)"}) in log.lines
    m.restore()
    assert net.mask("in0") == "0"


def test_manager_writes_nothing_where_sysfs_is_another_namespace(tmp_path):
    """/sys mounted for another namespace (the daemon started by nsenter --net): its devices
    differ from this namespace's; nothing is written, one warning, status says why."""
    net = FakeNet(tmp_path, {"lo": (1, 1), "eth0": (2, 1), "in0": (5, 1), "up0": (6, 1)})
    net.set("in0", "1")
    log = RecLog()
    here = {"lo": 1, "in0": 5, "up0": 6}  # no eth0 in this namespace: same names otherwise
    m = net.manager(log, links=here)
    m.sync(Settings("all"))
    m.sync(Settings("all"))
    assert (net.mask("in0"), net.mask("up0"), net.mask("eth0")) == ("1", "0", "0")
    warned = [x for x in log.lines if x[0] == "warning"]
    assert len(warned) == 1 and warned[0][1] == "rps_not_applied"
    st = m.as_dict()
    assert "shows the devices of another network namespace" in st["refused"] and "eth0 (ifindex 2)" in st["refused"]
    assert st["devices"]["in0"]["error"] == "not applied"
    m.restore()
    assert net.mask("in0") == "1"


def test_manager_a_device_made_between_the_two_listings_is_not_another_namespace(tmp_path):
    """netlink and /sys/class/net are listed one after the other: a device created (or gone)
    between them (a PPP session's device, a container's veth) made them differ once, and that
    start refused rps_cpus for good (the hook check looks again only when a configured device's
    ifindex changes) and flagged the gateway unhealthy; at a stop, its masks stayed ours."""
    net = FakeNet(tmp_path, {"lo": (1, 1), "in0": (5, 1), "up0": (6, 1)})
    log, racing = RecLog(), {"on": True}

    def nameindex():  # netlink's dump taken just before ppp0 (device n) appeared in /sys
        links = [(i, n) for n, i in net.links.items()]
        if racing["on"]:
            racing["on"] = False
            net.add(f"ppp{len(net.links)}", 10 + len(net.links))
        return links

    m = net.manager(log)
    m.nameindex = nameindex
    m.sync(Settings("all"))
    assert m.refused is None and (net.mask("in0"), net.mask("up0")) == ("3", "3")
    assert not [x for x in log.lines if x[0] == "warning"]
    racing["on"] = True  # the same at the stop
    m.restore()
    assert m.refused is None and (net.mask("in0"), net.mask("up0")) == ("0", "0")


def test_manager_bonding_masters_is_no_device(tmp_path):
    """With the bonding driver loaded, every namespace's /sys/class/net holds a file
    bonding_masters (bond_net_init: per namespace), which no netlink listing has: it read as a
    device with no ifindex and every gateway on such a host refused rps_cpus as another
    namespace's sysfs (and called itself unhealthy)."""
    net = FakeNet(tmp_path, {"lo": (1, 1), "in0": (5, 1), "up0": (6, 1)})
    with open(os.path.join(net.root, "class/net/bonding_masters"), "w") as f:
        f.write("\n")
    m = net.manager()
    m.sync(Settings("all"))
    assert m.refused is None and (net.mask("in0"), net.mask("up0")) == ("3", "3")
    m.restore()
    assert (net.mask("in0"), net.mask("up0")) == ("0", "0")


def test_manager_same_names_other_ifindex_is_another_namespace(tmp_path):
    net = FakeNet(tmp_path, {"lo": (1, 1), "in0": (5, 1), "up0": (6, 1)})
    m = net.manager(links={"lo": 1, "in0": 15, "up0": 16})
    m.sync(Settings("all"))
    assert m.refused and net.mask("in0") == "0"


def test_manager_cpus_gone_offline_are_left_out_with_a_note(tmp_path, monkeypatch):
    net = FakeNet(tmp_path, {"lo": (1, 1), "in0": (5, 1), "up0": (6, 1)})
    monkeypatch.setattr(rps, "online_cpus", lambda sysfs=rps.SYSFS: frozenset({0}))
    m = net.manager()
    m.sync(Settings("0-1"))
    assert net.mask("in0") == "1" and "CPUs 1 of 0-1 are not online" in m.as_dict()["note"]


def test_sysfs_found_ours_is_not_walked_again_while_it_is_the_same_mount(tmp_path, monkeypatch):
    """Every device of /sys/class/net was read (and compared with netlink) at each apply,
    under the service lock: ~125-175 ms with 2,000 devices.  Once it is found this namespace's,
    /sys/class/net is held open (sysfs has one superblock per network namespace; held, its
    device number is not reused): while the path is that very directory it is not walked
    again; another directory there is walked (and refused if it is another namespace's)."""
    net = FakeNet(tmp_path / "a", {"lo": (1, 1), "in0": (5, 1), "up0": (6, 1)})
    m = net.manager()
    m.sync(Settings("all"))
    assert m.refused is None and net.mask("in0") == "3"
    walks = []
    real = m._compare_sysfs
    monkeypatch.setattr(m, "_compare_sysfs", lambda: walks.append(1) or real())
    m.sync(Settings("1"))
    assert walks == [] and net.mask("in0") == "2"
    other = FakeNet(tmp_path / "b", {"lo": (1, 1), "eth0": (2, 1), "in0": (5, 1), "up0": (6, 1)})
    m.sysfs = other.root  # (another mount on /sys: another directory)
    m.sync(Settings("all"))
    assert walks and m.refused and other.mask("in0") == "0"
    m.sysfs = net.root
    m.restore()
    assert net.mask("in0") == "0"


# --------------------------------------------------------------------------- the state file


def test_a_killed_daemons_successor_puts_back_the_masks_before_the_first(tmp_path):
    """The masks before are in the state file before the first write: a daemon killed (no
    restore) leaves its mask, and the next one, reading the file, puts back the operator's
    (not the killed one's mask, which it took for the device's own until 30 Nov 2026); the
    file goes once nothing is held."""
    net = FakeNet(tmp_path / "sys", {"lo": (1, 1), "in0": (5, 2), "up0": (6, 1)})
    net.set("in0", "2", 1)
    state = str(tmp_path / "owner.rps")
    first = net.manager(state=state)
    first.sync(Settings("all"))
    assert (net.mask("in0", 0), net.mask("in0", 1), net.mask("up0")) == ("3", "3", "3")
    assert os.path.exists(state) and not os.path.exists(state + ".tmp")
    del first  # SIGKILL: no restore
    log = RecLog()
    second = net.manager(log, state=state)
    second.sync(Settings("all"))
    assert second.as_dict()["devices"]["in0"]["previous"] == {"rx-0": "0", "rx-1": "2"}
    assert any(x[1] == "rps_state" and x[2]["devices"] == "in0,up0" for x in log.lines)
    second.restore()
    assert (net.mask("in0", 0), net.mask("in0", 1), net.mask("up0")) == ("0", "2", "0")
    assert not os.path.exists(state)


def test_the_state_file_follows_a_device_leaving_and_off_after_a_kill(tmp_path):
    """A device that leaves the config goes from the file once its masks are back; a daemon
    started with `off` after a killed one puts back what the file holds."""
    net = FakeNet(tmp_path / "sys", {"lo": (1, 1), "in0": (5, 1), "in1": (7, 1), "up0": (6, 1)})
    net.set("in1", "1")
    state = str(tmp_path / "owner.rps")
    m = net.manager(state=state)
    m.sync(Settings("all", inside=("in0", "in1")))
    m.sync(Settings("all", inside=("in0",)))
    with open(state) as f:
        assert set(json.load(f)["devices"]) == {"in0", "up0"}
    assert net.mask("in1") == "1"
    net.manager(state=state).sync(Settings("off"))  # (m killed)
    assert (net.mask("in0"), net.mask("up0"), net.mask("in1")) == ("0", "0", "1")
    assert not os.path.exists(state)


@pytest.mark.parametrize("content, why", [
    (b"{not json", "Expecting property name"),
    (b'{"version": 9, "devices": {}}', "not an rps_cpus state file of version 1"),
    (b'{"version": 1, "devices": {"in0": {"ifindex": 5, "masks": {"rx-0": "zz"}}}}', "invalid literal"),
    (b'{"version": 1, "devices": {"../x": {"ifindex": 5, "masks": {}}}}', "is not a device name"),
    (b'{"version": 1, "devices": {"in0": {"ifindex": 5, "masks": {"tx-0": "1"}}}}', "expected a queue rx-N"),
    (b'{"version": 1, "netns": 1, "devices": {"in0": {"ifindex": 5, "masks": {"rx-0": "1"}}}}',
     "written in another network namespace (cookie 1;"),
    (b" " * (rps.STATE_MAX_BYTES + 1), "larger than the 1048576 bytes"),
])
def test_a_state_file_that_is_not_one_is_named_in_a_warning_and_ignored(tmp_path, content, why):
    """Corrupt, another version, a bad name or mask, another namespace's (one gone, whose inode
    number this one reuses: the cookie differs), too big: a warning naming the file and why,
    the masks found are taken as the devices' own, and the file is replaced at the write."""
    net = FakeNet(tmp_path / "sys", {"lo": (1, 1), "in0": (5, 1), "up0": (6, 1)})
    net.set("in0", "1")
    state = str(tmp_path / "owner.rps")
    with open(state, "wb") as f:
        f.write(content)
    log = RecLog()
    m = net.manager(log, state=state)
    m.sync(Settings("all"))
    warned = [x for x in log.lines if x[0] == "warning"]
    assert len(warned) == 1 and warned[0][1] == "rps_state_ignored", log.lines
    assert warned[0][2]["file"] == state and why in warned[0][2]["error"]
    assert m.as_dict()["devices"]["in0"]["previous"] == {"rx-0": "1"}
    with open(state) as f:
        assert json.load(f)["devices"]["in0"] == {"ifindex": 5, "masks": {"rx-0": "1"}}
    m.restore()
    assert net.mask("in0") == "1" and not os.path.exists(state)


def test_a_state_file_that_cannot_be_written_is_said_once_and_the_masks_still_applied(tmp_path):
    net = FakeNet(tmp_path / "sys", {"lo": (1, 1), "in0": (5, 1), "up0": (6, 1)})
    log = RecLog()
    m = net.manager(log, state=str(tmp_path / "missing" / "owner.rps"))
    m.sync(Settings("all"))
    m.sync(Settings("1"))
    assert net.mask("in0") == "2"
    warned = [x for x in log.lines if x[0] == "warning"]
    assert [x[1] for x in warned] == ["rps_state_failed"] and "No such file" in warned[0][2]["error"]
    assert "missing/owner.rps" in m.as_dict()["state_error"]
    m.restore()
    assert net.mask("in0") == "0"


# --------------------------------------------------------------------------- the service's wiring


def test_service_applies_on_start_reload_and_hook_check_and_puts_back_on_stop(tmp_path):
    """The daemon's service owns the manager: start writes, a reload changing the setting
    writes, the hook check follows a recreated device, stop puts back (fake backend, fake sysfs)."""
    import io

    from snatgw.daemon.log import Log
    from snatgw.daemon.service import Service
    from snatgw.datapath.fake import FakeBackend

    net = FakeNet(tmp_path / "sys", {"lo": (1, 1), "in0": (5, 1), "up0": (6, 1)})
    net.set("in0", "2")
    def text(value: str) -> str:
        return f"snatgw {{\n inside in0\n outside up0\n rps_cpus {value}\n}}\n" + RULES

    cfg = parse_text(text("all"), "t.conf", [])
    out = io.StringIO()
    svc = Service(cfg, FakeBackend(cfg.settings), Log(stream=out))
    svc.rps = net.manager(svc.log)
    svc.start()
    assert (net.mask("in0"), net.mask("up0")) == ("3", "3")
    assert svc.status()["rps"]["devices"]["in0"]["previous"] == {"rx-0": "2"}
    svc.reload(text=text("0"))
    assert net.mask("in0") == "1"
    net.add("up0", 16)
    svc.check_hooks()
    assert net.mask("up0") == "1"
    assert "event=rps_cpus" in out.getvalue() and "recreated (ifindex 6 -> 16)" in out.getvalue()
    svc.stop()
    assert (net.mask("in0"), net.mask("up0")) == ("2", "0")


def test_status_and_stats_text():
    from snatgw.cli.commands.stats import per_cpu_line, summarize
    from snatgw.cli.commands.status import rps_text

    assert per_cpu_line([588, 612]) == "packets per CPU: cpu0 588 (49%), cpu1 612 (51%)"
    assert summarize({"per_cpu": [1, 2]}, [])["per_cpu"] == [1, 2]
    assert "per_cpu" not in summarize({}, [])
    assert rps_text({"setting": "off", "mask": None, "note": None, "refused": None, "devices": {}}) == \
        "rps_cpus: off (the devices' receive packet steering is left as it is)"
    text = rps_text({"setting": "all", "mask": "3", "note": None, "refused": None,
                     "devices": {"lan40": {"queues": {"rx-0": "3"}, "previous": {"rx-0": "1"}, "error": None}}})
    assert text.splitlines()[0] == "rps_cpus: all (mask 3)" and "rx-0=3" in text and "rx-0=1" in text
    assert "NOT APPLIED: why" in rps_text({"setting": "all", "mask": "3", "note": None, "refused": "why",
                                           "devices": {}})


def test_manager_never_raises(tmp_path):
    """A failure no branch foresaw is logged (rps_failed): a start, reload or stop goes on."""
    net = FakeNet(tmp_path, {"lo": (1, 1), "in0": (5, 1), "up0": (6, 1)})
    log = RecLog()
    m = net.manager(log)

    def broken():
        raise RuntimeError("boom")

    m.nameindex = broken
    assert m.sync(Settings("all")) == [] and m.restore() == []
    assert [x[1] for x in log.lines] == ["rps_failed"]  # (restore: nothing was saved, nothing to do)
