"""set_accept_local (bpf backend start): writes 1 to each inside device's accept_local and only
warns when it cannot (a read-only /proc/sys must not stop the gateway)."""

import logging

from snatgw.datapath.bpf.backend import set_accept_local


def test_accept_local_written_for_each_device_and_missing_one_only_warns(tmp_path, caplog):
    """lan40 gets "1"; an absent device is logged as a warning, nothing raised."""
    (tmp_path / "lan40").mkdir()
    (tmp_path / "lan40" / "accept_local").write_text("0\n")
    with caplog.at_level(logging.WARNING, logger="snatgw.bpf"):
        set_accept_local(["lan40", "lan99"], conf_dir=str(tmp_path))
    assert (tmp_path / "lan40" / "accept_local").read_text() == "1\n"
    assert "lan99" in caplog.text and "accept_local" in caplog.text


def test_forwarding_off_is_warned_about(tmp_path, caplog):
    """With net.ipv4.ip_forward 0 the kernel drops what the programs hand it translated (over
    the MTU, replies it must answer the remote about): the backend says so at start."""
    from snatgw.datapath.bpf.backend import warn_without_forwarding

    p = tmp_path / "ip_forward"
    p.write_text("0\n")
    with caplog.at_level("WARNING"):
        assert warn_without_forwarding(str(p)) is False
    assert "ip_forward is 0" in caplog.text
    p.write_text("1\n")
    caplog.clear()
    assert warn_without_forwarding(str(p)) is True and caplog.text == ""
