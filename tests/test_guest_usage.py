"""The agent's usage and processes ops, run on this host's own /proc, and the host's checks
of what a (possibly hostile) guest replies."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

from kelpie.guest._usage import op_processes, op_usage
from kelpie.vm import GuestProcesses, GuestUsage, HostUsage


def test_usage_reads_the_kernels_counters() -> None:
    reply = op_usage("/", 1, {})
    usage = GuestUsage.from_reply(reply)
    statvfs = os.statvfs("/")
    assert usage.disk_total == statvfs.f_blocks * statvfs.f_frsize
    assert 0 < usage.memory_used < usage.memory_total
    assert usage.cpu_seconds > 0 and usage.cpus == os.cpu_count()
    assert usage.processes >= 1 and usage.uptime > 0


def test_processes_lists_a_child_with_its_argv() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        listing = GuestProcesses.from_reply(op_processes(1, {}))
        (found,) = [p for p in listing.processes if p.pid == child.pid]
        assert (found.ppid, found.uid, found.argv) == (os.getpid(), os.getuid(),
                                                       ("sleep", "30"))
        assert found.state in "RS" and found.started <= listing.uptime
        assert any(p.pid == os.getpid() and p.memory > 0 for p in listing.processes)
    finally:
        child.kill()
        child.wait()


def test_the_host_sees_its_own_process() -> None:
    usage = HostUsage.of_process(os.getpid(), None)
    assert usage is not None and usage.memory > 0 and usage.cpu_seconds > 0
    assert HostUsage.of_process(2**22 + 12345, None) is None  # no such process


GOOD_USAGE: dict[str, Any] = {
    "clk_tck": 100, "cpus": 2, "cpu_busy_ticks": 250, "cpu_idle_ticks": 10,
    "memory_total": 1000, "memory_available": 400, "disk_total": 10, "disk_used": 5,
    "disk_available": 4, "net_rx": 1, "net_tx": 2, "processes": 3, "uptime": 9.5}


@pytest.mark.parametrize(("field", "value"), [
    ("cpu_busy_ticks", -1), ("memory_total", "lots"), ("net_rx", True), ("uptime", None),
    ("processes", 2**70), ("disk_used", 1.5)])
def test_a_malformed_usage_reply_names_its_field(field: str, value: object) -> None:
    assert GuestUsage.from_reply(GOOD_USAGE).cpu_seconds == 2.5
    with pytest.raises(ValueError, match=f"field {field!r}"):
        GuestUsage.from_reply({**GOOD_USAGE, field: value})


def _process(**changes: object) -> dict[str, Any]:
    return {"pid": 1, "ppid": 0, "uid": 0, "state": "S", "cpu_ticks": 5, "start_ticks": 1,
            "rss": 4096, "argv": ["/sbin/init"], **changes}


@pytest.mark.parametrize(("reply", "problem"), [
    ({"clk_tck": 100, "uptime": 1, "processes": "all"}, "must be a list"),
    ({"clk_tck": 100, "uptime": 1, "processes": [_process()] * 4097}, "at most 4096"),
    ({"clk_tck": 100, "uptime": 1, "processes": [7]}, "must be an object"),
    ({"clk_tck": 100, "uptime": 1, "processes": [_process(argv="sh")]}, "list of strings"),
    ({"clk_tck": 100, "uptime": 1, "processes": [_process(state="RUN")]}, "one letter"),
    ({"clk_tck": 100, "uptime": 1, "processes": [_process(pid=-3)]}, "field 'pid'"),
])
def test_a_malformed_process_list_is_refused(reply: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        GuestProcesses.from_reply(reply)
