"""connection_churn, tcp_retransmits and port_exhaustion on synthetic snapshots."""

from __future__ import annotations

from dataclasses import replace

from snapshots import TICK, cgroup, proc, rule_cfg, series, snap

from linnixd.detectors.net import (
    ConnectionChurnDetector,
    PortExhaustionDetector,
    TcpRetransmitsDetector,
    net_rates,
)
from linnixd.model import NetCounts, NetnsSegments, PortHolder, PortUsage, RemoteSample, Snapshot

APP = "/system.slice/app.service"
CLIENT = proc(4242, comm="client", cgroup=APP)


def churn_snap(i: int, connects: int = 500, short: int | None = None, pid: int = 4242) -> Snapshot:
    closed = connects
    c = NetCounts(connects=connects, closed=closed, short=closed if short is None else short)
    return replace(
        snap(i, [CLIENT], cgroups=[cgroup(APP)]),
        net_by_pid={pid: c},
        net_by_cgroup={APP: c},
        net_remotes=(RemoteSample(pid, APP, "10.0.0.7:5432", connects=connects),),
    )


def test_churn_names_the_process_with_its_figures() -> None:
    window = series(12, churn_snap)  # 1000/s for 6 s
    (f,) = ConnectionChurnDetector().evaluate(window, rule_cfg("connection_churn"))
    assert f.rule == "connection_churn" and f.key == "pid:4242:42.42"
    assert f.culprit.pid == 4242 and f.culprit.comm == "client" and f.culprit.cgroup == APP
    ev = f.evidence
    assert ev["connects"] == 500 * 10 and ev["connects_per_s"] == 1000.0  # the 5 s tail
    assert ev["short_share"] == 1.0 and ev["top_remotes"] == [
        {"remote": "10.0.0.7:5432", "connects": 5000}
    ]


def test_churn_needs_every_interval_above_the_rate() -> None:
    window = series(12, lambda i: churn_snap(i, 50 if i == 6 else 500))
    assert ConnectionChurnDetector().evaluate(window, rule_cfg("connection_churn")) == []


def test_churn_of_long_lived_connections_is_not_churn() -> None:
    window = series(12, lambda i: churn_snap(i, short=100))  # 20% short
    assert ConnectionChurnDetector().evaluate(window, rule_cfg("connection_churn")) == []


def test_churn_cgroup_scope_when_no_single_process_is_above() -> None:
    def make(i: int) -> Snapshot:
        s = churn_snap(i)
        per = NetCounts(connects=50, closed=50, short=50)
        return replace(s, net_by_pid={p: per for p in range(100, 110)})

    (f,) = ConnectionChurnDetector().evaluate(series(12, make), rule_cfg("connection_churn"))
    assert (
        f.key == f"cgroup:{APP}" and f.culprit.kind == "cgroup" and f.culprit.unit == "app.service"
    )


def test_churn_exclusion_by_comm() -> None:
    cfg = rule_cfg("connection_churn", scope=["process"], exclude={"comms": ["client"]})
    assert ConnectionChurnDetector().evaluate(series(12, churn_snap), cfg) == []


def retrans_snap(i: int, n: int = 30, out: int = 1000) -> Snapshot:
    c = NetCounts(retransmits=n)
    return replace(
        snap(i, [CLIENT], cgroups=[cgroup(APP)]),
        net_by_pid={4242: c},
        net_by_cgroup={APP: c},
        net_remotes=(RemoteSample(4242, APP, "[2001:db8::1]:443", retransmits=n),),
        net_segments={4242: NetnsSegments(77, out, n)},
    )


def test_retransmits_name_the_process_and_the_remote() -> None:
    (f,) = TcpRetransmitsDetector().evaluate(series(12, retrans_snap), rule_cfg("tcp_retransmits"))
    assert f.key == f"cgroup:{APP}" and f.culprit.pid == 4242
    ev = f.evidence
    assert ev["retransmits_per_s"] == 60.0 and ev["top_remote"] == "[2001:db8::1]:443"
    assert ev["share"] == 0.03 and ev["netns_out_segs"] == 10000


def test_retransmits_below_the_share_of_traffic_do_not_fire() -> None:
    window = series(12, lambda i: retrans_snap(i, out=100_000))  # 0.03% of the segments
    assert TcpRetransmitsDetector().evaluate(window, rule_cfg("tcp_retransmits")) == []


def test_one_burst_of_retransmits_does_not_fire() -> None:
    window = series(12, lambda i: retrans_snap(i, n=400) if i == 11 else snap(i, [CLIENT]))
    assert TcpRetransmitsDetector().evaluate(window, rule_cfg("tcp_retransmits")) == []


def ports_snap(i: int, in_use: int) -> Snapshot:
    usage = PortUsage(
        netns=99,
        range_lo=40000,
        range_hi=40099,
        range_source="netns",
        ports_in_use=in_use,
        time_wait=10,
        busiest_remote="127.0.0.1:80",
        busiest_remote_ports=in_use,
        holders=(PortHolder(4242, 85, 10), PortHolder(5000, 3, 0)),
    )
    return replace(snap(i, [CLIENT, proc(5000, comm="other")]), net_ports=(usage,))


def test_port_exhaustion_names_the_top_holder() -> None:
    (f,) = PortExhaustionDetector().evaluate([ports_snap(0, 95)], rule_cfg("port_exhaustion"))
    assert f.key == "netns:99" and f.severity == "critical" and f.culprit.pid == 4242
    ev = f.evidence
    assert ev["pct"] == 95.0 and ev["port_range"] == "40000-40099" and ev["time_wait"] == 10
    assert [h["pid"] for h in ev["holders"]] == [4242, 5000]


def test_port_exhaustion_below_the_threshold_and_measurement_ages_out() -> None:
    det, cfg = PortExhaustionDetector(), rule_cfg("port_exhaustion")
    assert det.evaluate([ports_snap(0, 80)], cfg) == []
    # the measurement (about once a second) is used while it is recent, not forever
    window = [ports_snap(0, 95)] + [snap(i, [CLIENT]) for i in range(1, 12)]
    assert det.evaluate(window, cfg) == []
    assert len(det.evaluate(window[:5], cfg)) == 1


def test_net_rates_per_cgroup() -> None:
    rates = net_rates(series(4, churn_snap))
    assert rates[APP] == {"connects_per_s": 500 / TICK, "retransmits_per_s": 0.0}


def test_top_rows_carry_connection_and_retransmit_rates_only_with_bpf_net() -> None:
    from linnixd.views import top_cgroups

    window = [replace(churn_snap(i), net_total=NetCounts(connects=500)) for i in range(6)]
    (row,) = top_cgroups([{"path": APP}], window, 10.0)
    assert row["connects_per_s"] == 1000.0 and row["retransmits_per_s"] == 0.0
    (plain,) = top_cgroups([{"path": APP}], [snap(i) for i in range(6)], 10.0)
    assert "connects_per_s" not in plain  # not attached: top shows "-", not a false 0
