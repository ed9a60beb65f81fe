"""Confine one child process like a small device: a CPU quota and a memory limit, from the OS's own controls.

Three mechanisms, tried in this order, and the one used is named in every result:

``cgroup2``
    A child cgroup under this process's own cgroup in the unified hierarchy, with
    ``cpu.max`` (quota per period) and ``memory.max``; needs the ``cpu`` and ``memory``
    controllers enabled for children and a writable directory.
``cgroup1``
    The same limits in the legacy hierarchy: ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` in
    the ``cpu`` controller and ``memory.limit_in_bytes`` in the ``memory`` controller,
    each a child of the cgroup this process is already in (so the sandbox's own
    accounting still covers it).
``rlimit``
    No cgroup can be created: the child is pinned to one CPU (``sched_setaffinity``), a
    parent thread stops and continues it (``SIGSTOP``/``SIGCONT``) so that it runs only
    ``cpu_fraction`` of each period, and ``RLIMIT_DATA`` caps its heap. This is coarser
    (the throttle is a duty cycle on wall time, the limit is on address space, not
    resident memory) and says so.

The child joins its cgroup in ``preexec_fn`` (after ``fork``, before ``exec``), so the
interpreter's start-up and imports are already confined.
"""

from __future__ import annotations

import os
import resource
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000


@dataclass(frozen=True)
class Limits:
    """What the emulated device has: a share of one core and a memory ceiling (bytes; 0 = none)."""

    cpu_fraction: float
    memory_bytes: int = 0

    def __post_init__(self) -> None:
        if not 0.01 <= self.cpu_fraction <= 64.0:
            raise ValueError(f"cpu fraction must be in [0.01, 64] cores, got {self.cpu_fraction}")
        if self.memory_bytes < 0:
            raise ValueError("memory limit must be >= 0")


def _own_cgroups() -> dict[str, str]:
    """controller (or "" for the unified hierarchy) -> this process's cgroup path, from /proc/self/cgroup."""
    out: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            out[""] = path
        for c in controllers.split(","):
            if c:
                out[c] = path
    return out


def _try_mkdir(parent: Path, name: str) -> Path | None:
    d = parent / name
    try:
        d.mkdir()
    except OSError:
        return None
    return d


def _write(path: Path, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


class Confiner:
    """Base: one confinement for one child process; use :func:`make_confiner`."""

    mechanism = "none"

    def __init__(self, limits: Limits, name: str) -> None:
        self.limits = limits
        self.name = name
        self.pid: int | None = None

    def preexec(self) -> None:  # runs in the child between fork and exec
        pass

    def started(self, pid: int) -> None:
        self.pid = pid

    def cpu_seconds(self) -> float | None:
        """CPU time the confined process used, as the control group counts it (None if not counted)."""
        return None

    def peak_memory_bytes(self) -> int | None:
        return None

    def throttle_stats(self) -> dict[str, int]:
        return {}

    def describe(self) -> dict:
        return {"mechanism": self.mechanism, "cpu_fraction": self.limits.cpu_fraction,
                "memory_bytes": self.limits.memory_bytes}

    def close(self) -> None:
        pass


class Cgroup2Confiner(Confiner):
    mechanism = "cgroup2"

    def __init__(self, limits: Limits, name: str, directory: Path) -> None:
        super().__init__(limits, name)
        self.dir = directory
        quota = max(1000, int(limits.cpu_fraction * PERIOD_US))
        _write(directory / "cpu.max", f"{quota} {PERIOD_US}")
        if limits.memory_bytes:
            _write(directory / "memory.max", str(limits.memory_bytes))
            try:
                _write(directory / "memory.swap.max", "0")
            except OSError:
                pass

    def preexec(self) -> None:
        _write(self.dir / "cgroup.procs", str(os.getpid()))

    def cpu_seconds(self) -> float | None:
        try:
            for line in (self.dir / "cpu.stat").read_text().splitlines():
                k, v = line.split()
                if k == "usage_usec":
                    return int(v) / 1e6
        except (OSError, ValueError):
            return None
        return None

    def peak_memory_bytes(self) -> int | None:
        try:
            return int((self.dir / "memory.peak").read_text())
        except (OSError, ValueError):
            return None

    def throttle_stats(self) -> dict[str, int]:
        out = {}
        try:
            for line in (self.dir / "cpu.stat").read_text().splitlines():
                k, v = line.split()
                if k in ("nr_periods", "nr_throttled", "throttled_usec"):
                    out[k] = int(v)
        except (OSError, ValueError):
            pass
        return out

    def close(self) -> None:
        try:
            self.dir.rmdir()
        except OSError:
            pass


class Cgroup1Confiner(Confiner):
    mechanism = "cgroup1"

    def __init__(self, limits: Limits, name: str, cpu_dir: Path, mem_dir: Path | None, acct_dir: Path | None) -> None:
        super().__init__(limits, name)
        self.cpu_dir, self.mem_dir, self.acct_dir = cpu_dir, mem_dir, acct_dir
        _write(cpu_dir / "cpu.cfs_period_us", str(PERIOD_US))
        _write(cpu_dir / "cpu.cfs_quota_us", str(max(1000, int(limits.cpu_fraction * PERIOD_US))))
        if mem_dir is not None and limits.memory_bytes:
            _write(mem_dir / "memory.limit_in_bytes", str(limits.memory_bytes))

    def preexec(self) -> None:
        for d in (self.cpu_dir, self.mem_dir, self.acct_dir):
            if d is not None:
                _write(d / "cgroup.procs", str(os.getpid()))

    def cpu_seconds(self) -> float | None:
        if self.acct_dir is None:
            return None
        try:
            return int((self.acct_dir / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError):
            return None

    def peak_memory_bytes(self) -> int | None:
        if self.mem_dir is None:
            return None
        try:
            return int((self.mem_dir / "memory.max_usage_in_bytes").read_text())
        except (OSError, ValueError):
            return None

    def throttle_stats(self) -> dict[str, int]:
        out = {}
        try:
            for line in (self.cpu_dir / "cpu.stat").read_text().splitlines():
                k, v = line.split()
                if k in ("nr_periods", "nr_throttled", "throttled_time"):
                    out[k] = int(v)
        except (OSError, ValueError):
            pass
        return out

    def close(self) -> None:
        for d in (self.cpu_dir, self.mem_dir, self.acct_dir):
            if d is not None:
                try:
                    d.rmdir()
                except OSError:
                    pass


class RlimitConfiner(Confiner):
    """Affinity to one CPU, a SIGSTOP/SIGCONT duty cycle from a parent thread, RLIMIT_DATA."""

    mechanism = "rlimit"

    def __init__(self, limits: Limits, name: str) -> None:
        super().__init__(limits, name)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def preexec(self) -> None:
        try:
            cpus = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {cpus[-1]})
        except (AttributeError, OSError):
            pass
        if self.limits.memory_bytes:
            resource.setrlimit(resource.RLIMIT_DATA, (self.limits.memory_bytes, self.limits.memory_bytes))

    def started(self, pid: int) -> None:
        super().started(pid)
        if self.limits.cpu_fraction < 1.0:
            self._thread = threading.Thread(target=self._duty_cycle, args=(pid,), daemon=True)
            self._thread.start()

    def _duty_cycle(self, pid: int) -> None:
        period = PERIOD_US / 1e6
        run = period * self.limits.cpu_fraction
        try:
            while not self._stop.is_set():
                time.sleep(run)
                os.kill(pid, signal.SIGSTOP)
                time.sleep(period - run)
                os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            return
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def describe(self) -> dict:
        d = super().describe()
        d["note"] = ("CPU: pinned to one core and stopped/continued on a 100 ms duty cycle; memory: RLIMIT_DATA "
                     "(address space of the heap, not resident memory)")
        return d

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


def _cgroup2(limits: Limits, name: str) -> Confiner | None:
    own = _own_cgroups()
    if "" not in own:
        return None
    for root in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
        ctl = root / "cgroup.controllers"
        if not ctl.exists():
            continue
        parent = root / own[""].lstrip("/")
        try:
            enabled = set((parent / "cgroup.subtree_control").read_text().split())
        except OSError:
            continue
        need = {"cpu", "memory"} if limits.memory_bytes else {"cpu"}
        if not need <= enabled:
            available = set((parent / "cgroup.controllers").read_text().split()) if (parent / "cgroup.controllers").exists() else set()
            if not need <= available:
                continue
            try:  # only possible when the parent holds no processes itself (the "no internal processes" rule)
                _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(need)))
            except OSError:
                continue
        d = _try_mkdir(parent, name)
        if d is None:
            continue
        try:
            return Cgroup2Confiner(limits, name, d)
        except OSError:
            try:
                d.rmdir()
            except OSError:
                pass
    return None


def _cgroup1(limits: Limits, name: str) -> Confiner | None:
    own = _own_cgroups()
    made: list[Path] = []

    def child(controller: str) -> Path | None:
        mount = CGROUP_ROOT / controller
        if controller not in own or not (mount / "cgroup.procs").exists():
            return None
        d = _try_mkdir(mount / own[controller].lstrip("/"), name)
        if d is not None:
            made.append(d)
        return d

    cpu = child("cpu")
    if cpu is None or not (cpu / "cpu.cfs_quota_us").exists():
        for d in made:
            d.rmdir()
        return None
    mem = child("memory") if limits.memory_bytes else None
    if limits.memory_bytes and mem is None:
        for d in made:
            d.rmdir()
        return None
    acct = child("cpuacct") if (CGROUP_ROOT / "cpuacct").resolve() != (CGROUP_ROOT / "cpu").resolve() else cpu
    try:
        return Cgroup1Confiner(limits, name, cpu, mem, acct)
    except OSError:
        for d in made:
            try:
                d.rmdir()
            except OSError:
                pass
        return None


def make_confiner(limits: Limits, name: str, *, allow: tuple[str, ...] = ("cgroup2", "cgroup1", "rlimit")) -> Confiner:
    """The first mechanism of ``allow`` this machine lets us use (``rlimit`` always works on Linux)."""
    makers: dict[str, Callable[[Limits, str], Confiner | None]] = {
        "cgroup2": _cgroup2, "cgroup1": _cgroup1, "rlimit": lambda lim, n: RlimitConfiner(lim, n)}
    for mech in allow:
        confiner = makers[mech](limits, f"{name}-{os.getpid()}")
        if confiner is not None:
            return confiner
    raise RuntimeError(f"none of {allow} can confine a process on this machine")


__all__ = ["Confiner", "Limits", "make_confiner"]
