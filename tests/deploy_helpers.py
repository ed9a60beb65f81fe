"""Real deployments for tests: a throwaway CA, device keys, digits split into CSVs, and processes.

Everything here runs for real: ``ftte server`` and ``ftte edge`` are separate Python
processes talking HTTPS over 127.0.0.1 with certificates made by :func:`make_pki`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ftte.crypto.primitives import Signer

from ftte.http_auth import member_id

CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
}


# -- PKI ----------------------------------------------------------------------------------------

from ftte.bench.http_pki import Pki, make_pki  # noqa: F401  (re-exported: the tests make their CA here)
from ftte.bench.loopback import digits_split, write_server_config  # noqa: F401  (re-exported)

# -- devices and data -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Device:
    index: int
    key_file: Path
    data_file: Path
    signer: Signer

    @property
    def member(self) -> int:
        return member_id(self.signer.public_key)


def make_devices(directory: Path, data_files: list[Path], extra_keys: int = 0) -> tuple[list[Device], Path]:
    """One key per data file (plus ``extra_keys`` allow-listed keys without data); returns the allow-list."""
    directory.mkdir(parents=True, exist_ok=True)
    devices, lines = [], []
    for i in range(len(data_files) + extra_keys):
        signer = Signer()
        key_file = directory / f"device{i}.key"
        key_file.write_bytes(signer.private_bytes())
        os.chmod(key_file, 0o600)
        lines.append(f"{signer.public_key.hex()} device{i}")
        devices.append(Device(i, key_file, data_files[i] if i < len(data_files) else Path(), signer))
    allow = directory / "devices.txt"
    allow.write_text("\n".join(lines) + "\n")
    return devices, allow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- processes ------------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(CHILD_ENV)
    return env


class ServerProcess:
    """``ftte server`` in a child process; restartable on the same port."""

    def __init__(self, config: Path, port: int, log: Path, ca: Path | None) -> None:
        self.config, self.port, self.log, self.ca = config, port, log, ca
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.ca else 'http'}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        self.starts += 1
        fh = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "ftte.cli", "server", "--config", str(self.config),
                                      "--port", str(self.port)], stdout=fh, stderr=subprocess.STDOUT, env=_env())
        fh.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                self.get("/v1/health", timeout=2.0)
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"server did not come up:\n{self.log.read_text()[-4000:]}")

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.ca)) if self.ca else None

    def get(self, path: str, timeout: float = 10.0) -> dict:
        import urllib.request

        with urllib.request.urlopen(self.url + path, timeout=timeout, context=self.ssl_context()) as r:
            return json.loads(r.read())

    def metrics(self) -> dict:
        return self.get("/v1/metrics?format=json")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class EdgeProcess:
    """``ftte edge --events`` in a child process; its JSON event lines are collected as they come."""

    device: Device
    proc: subprocess.Popen
    events: list[dict] = field(default_factory=list)
    stderr_path: Path | None = None

    def __post_init__(self) -> None:
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith(b"{"):
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    pass

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def named(self, name: str) -> list[dict]:
        return [e for e in list(self.events) if e.get("event") == name]


def edge_argv(server: ServerProcess, device: Device, state_root: Path, *, rounds: int, seed: int,
              exit_at: str | None = None, exit_round: int = 1, patience: float = 30.0, epsilon: float = 1000.0,
              join_patience: float = 10.0) -> list[str]:
    """Arguments of ``ftte edge`` for one test device."""
    argv = ["edge", "--server", server.url, "--key", str(device.key_file), "--data", str(device.data_file),
            "--target", "label", "--state", str(state_root / f"device{device.index}"), "--epsilon", str(epsilon),
            "--rounds", str(rounds), "--seed", str(seed), "--events", "--patience", str(patience),
            "--join-patience", str(join_patience)]
    argv += ["--ca", str(server.ca)] if server.ca else ["--insecure-plaintext"]
    if exit_at:
        argv += ["--exit-at", exit_at, "--exit-round", str(exit_round)]
    return argv


def start_edge(server: ServerProcess, device: Device, state_root: Path, **kwargs) -> EdgeProcess:
    """A real ``python -m ftte.cli edge`` process."""
    state_root.mkdir(parents=True, exist_ok=True)
    err = state_root / f"edge{device.index}.log"
    fh = open(err, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "ftte.cli", *edge_argv(server, device, state_root, **kwargs)],
                            stdout=subprocess.PIPE, stderr=fh, env=_env())
    fh.close()
    return EdgeProcess(device, proc, stderr_path=err)


class ForkedEdge:
    """A device process forked by :class:`EdgeFleet`; same interface as :class:`EdgeProcess`."""

    def __init__(self, fleet: EdgeFleet, device: Device, out: Path, err: Path) -> None:
        self.fleet, self.device, self.out, self.stderr_path = fleet, device, out, err
        self.pid: int | None = None

    @property
    def events(self) -> list[dict]:
        out = []
        if self.out.exists():
            for line in self.out.read_text().splitlines():
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
        return out

    def named(self, name: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == name]

    @property
    def returncode(self) -> int | None:
        return self.fleet.exits.get(self.device.index)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.returncode is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"device {self.device.index} still running after {timeout} s")
            time.sleep(0.1)
        return self.returncode

    def kill(self) -> None:
        if self.pid is not None and self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class EdgeFleet:
    """Runs ``tests/edge_zygote.py`` and forks devices from it (one torch import for the whole fleet)."""

    def __init__(self, log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("edge_zygote.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log_dir / "zygote.log", "ab"),
                                     env=_env(), text=True, bufsize=1)
        self.exits: dict[int, int] = {}
        self.edges: dict[int, ForkedEdge] = {}
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()  # the import runs while the caller starts the server; spawn() waits for it

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "ready" in msg:
                self._ready.set()
            elif "spawned" in msg:
                self.edges[msg["spawned"]].pid = msg["pid"]
            elif "exit" in msg:
                self.exits[msg["exit"]] = msg["code"]

    def spawn(self, server: ServerProcess, device: Device, state_root: Path, **kwargs) -> ForkedEdge:
        if not self._ready.wait(timeout=180):
            raise RuntimeError(f"edge zygote did not start: {(self.log_dir / 'zygote.log').read_text()[-2000:]}")
        state_root.mkdir(parents=True, exist_ok=True)
        edge = ForkedEdge(self, device, state_root / f"edge{device.index}.out", state_root / f"edge{device.index}.log")
        self.edges[device.index] = edge
        self.exits.pop(device.index, None)
        cmd = {"id": device.index, "argv": edge_argv(server, device, state_root, **kwargs),
               "stdout": str(edge.out), "stderr": str(edge.stderr_path)}
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + 30
        while edge.pid is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return edge

    def close(self) -> None:
        for edge in self.edges.values():
            edge.kill()
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- checks after a run ------------------------------------------------------------------------------

def audit(ledger: Path) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "ftte.cli", "audit", str(ledger)], capture_output=True, text=True,
                       env=_env(), timeout=300)
    return r.returncode, r.stdout + r.stderr


def read_state(db: Path) -> tuple[list[int], list[dict], list[dict]]:
    """(versions, cohort records, history rows) from a server state file."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        versions = [r[0] for r in conn.execute("SELECT version FROM server_versions ORDER BY version")]
        cohorts = [json.loads(r[0]) for r in conn.execute("SELECT record FROM server_cohorts ORDER BY rowid")]
        history = [json.loads(r[0]) for r in conn.execute("SELECT row FROM server_history ORDER BY version")]
        return versions, cohorts, history
    finally:
        conn.close()


def ledger_cohorts(db: Path) -> set[tuple[str, str]]:
    """(device_id, cohort_id) of every ledger row."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {(d, c) for d, c in conn.execute("SELECT device_id, cohort_id FROM privacy_ledger_rows")}
    finally:
        conn.close()


def check_run(db: Path, edges: list[EdgeProcess]) -> dict:
    """The invariants every deployment test checks; returns a summary for the assertions that vary."""
    versions, cohorts, history = read_state(db)
    assert versions == list(range(len(versions))), f"versions not contiguous: {versions}"
    by_id = {c["cohort_id"]: c for c in cohorts}
    applied = [c for c in cohorts if c.get("applied_version") is not None]
    assert sorted(c["applied_version"] for c in applied) == versions[1:], "each version comes from one cohort"
    rows = ledger_cohorts(db)
    missing = []
    for e in edges:
        for up in e.named("uploaded"):
            record = by_id.get(up["cohort"])
            if record is None:
                missing.append((up["member"], up["cohort"], "no cohort record"))
            elif not record["aborted"] and up["member"] not in record["included"]:
                missing.append((up["member"], up["cohort"], "acknowledged upload not in the sum"))
            if (str(up["member"]), up["cohort"]) not in rows:
                missing.append((up["member"], up["cohort"], "no ledger row"))
    assert not missing, f"acknowledged uploads missing: {missing}"
    code, out = audit(db)
    assert code == 0, f"ftte audit failed:\n{out}"
    return {"versions": versions, "cohorts": cohorts, "history": history, "applied": applied}


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def settle(server: ServerProcess, timeout: float = 60.0) -> dict:
    """Wait until no cohort is in flight (devices gone: stage timeouts finish or abort them)."""
    def idle():
        m = server.metrics()
        return m if m["cohorts_in_flight"] == 0 else None
    return wait_for(idle, timeout, 0.2, "in-flight cohorts to finish")


def epsilons(db: Path, state_root: Path, devices: list[Device]) -> dict[int, tuple[float, float]]:
    """member -> (ε of its last ledger row, ε its own accountant holds)."""
    import sqlite3

    from ftte.privacy.accountant import AccountantStore

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        last = {d: e for d, e in conn.execute(
            "SELECT device_id, epsilon_total FROM privacy_ledger_rows ORDER BY seq")}
    finally:
        conn.close()
    out = {}
    for d in devices:
        path = state_root / f"device{d.index}" / "accountant.db"
        if not path.exists():
            continue
        store = AccountantStore(path)
        try:
            own = store.epsilon(str(d.member)) if store.state(str(d.member)) else 0.0
        finally:
            store.close()
        out[d.member] = (last.get(str(d.member), 0.0), own)
    return out
