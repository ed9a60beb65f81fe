"""The device benchmark's confinement really confines: a busy child gets about its CPU quota, and a child
that allocates past the memory limit does not get the memory.

Real processes and the machine's own controls (a cgroup when one can be created here, else affinity,
a SIGSTOP/SIGCONT duty cycle and RLIMIT_DATA); nothing is simulated.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ftte.bench.device_confine import Limits, make_confiner

BUSY = """
import json, time
w0, c0 = time.perf_counter(), time.process_time()
x = 0
while time.perf_counter() - w0 < {seconds}:
    x += 1
print(json.dumps({{"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}}))
"""

GREEDY = """
blocks = []
for _ in range({mib} // 8):
    blocks.append(bytearray(8 << 20))
print("allocated", flush=True)
"""


def _run(confiner, code: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=confiner.preexec, text=True)
    confiner.started(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        confiner.close()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("mechanism", ["auto", "rlimit"])
def test_busy_child_gets_about_its_quota(mechanism):
    allow = ("cgroup2", "cgroup1", "rlimit") if mechanism == "auto" else ("rlimit",)
    confiner = make_confiner(Limits(0.25, 0), "ftte-test-busy", allow=allow)
    done = _run(confiner, BUSY.format(seconds=2.0))
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    share = r["cpu"] / r["wall"]
    # an unconfined busy loop gets close to 1.0 of a core; the quota is 0.25. A cgroup grants the quota
    # whenever a core is free; the duty cycle only caps it (the pinned core may be busy with others)
    low = 0.03 if confiner.mechanism == "rlimit" else 0.1
    assert low <= share <= 0.4, (confiner.mechanism, share)


@pytest.mark.parametrize("mechanism", ["auto", "rlimit"])
def test_child_cannot_allocate_past_the_memory_limit(mechanism):
    allow = ("cgroup2", "cgroup1", "rlimit") if mechanism == "auto" else ("rlimit",)
    confiner = make_confiner(Limits(1.0, 256 << 20), "ftte-test-mem", allow=allow)
    done = _run(confiner, GREEDY.format(mib=512))
    assert "allocated" not in done.stdout
    assert done.returncode != 0
    # and the same child under the limit completes
    confiner = make_confiner(Limits(1.0, 256 << 20), "ftte-test-mem-ok", allow=allow)
    done = _run(confiner, GREEDY.format(mib=64))
    assert done.returncode == 0 and "allocated" in done.stdout, done.stderr


def test_limits_are_checked():
    with pytest.raises(ValueError):
        Limits(0.0)
    with pytest.raises(ValueError):
        Limits(0.5, -1)


SELF_THROTTLE = """
import json, time
from ftte.bench.device_runner import own_cgroup_cpu_stat, throttled_seconds
path = own_cgroup_cpu_stat()
t0, w0 = throttled_seconds(path), time.perf_counter()
x = 0
while time.perf_counter() - w0 < 1.5:
    x += 1
print(json.dumps({"path": str(path), "throttled": throttled_seconds(path) - t0}))
"""


def test_a_confined_child_reads_its_own_throttling():
    """The device runner's --throttle reads the quota's hold-ups from its own cgroup: a busy child
    at a quarter core is held back for most of its wall time, and sees it."""
    confiner = make_confiner(Limits(0.25, 0), "ftte-test-throttle")
    if confiner.mechanism not in ("cgroup1", "cgroup2"):
        confiner.close()
        pytest.skip(f"no CPU cgroup can be made here ({confiner.mechanism})")
    done = _run(confiner, SELF_THROTTLE)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert "ftte-test-throttle" in r["path"]  # its own group, not the root's
    assert 0.5 <= r["throttled"] <= 1.5, r


def test_throttled_seconds_reads_both_cgroup_formats(tmp_path):
    from ftte.bench.device_runner import throttled_seconds

    v1 = tmp_path / "v1.stat"
    v1.write_text("nr_periods 12\nnr_throttled 11\nthrottled_time 562109382\n")
    v2 = tmp_path / "v2.stat"
    v2.write_text("usage_usec 10\nnr_periods 3\nnr_throttled 2\nthrottled_usec 250000\n")
    assert throttled_seconds(v1) == pytest.approx(0.562109382)
    assert throttled_seconds(v2) == pytest.approx(0.25)
