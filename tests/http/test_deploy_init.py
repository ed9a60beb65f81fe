"""``ftte deploy init``: the folder it writes is complete, loads, and holds real keys and certificates."""

from __future__ import annotations

import shlex
import ssl
import stat

import numpy as np

from ftte import cli


def init(tmp_path, capsys, *args: str) -> tuple[int, list[str], str]:
    code = cli.main(["deploy", "init", *args])
    out = capsys.readouterr()
    return code, [ln for ln in out.out.splitlines() if ln and not ln.startswith("#")], out.err


def test_init_writes_a_deployment_that_loads_and_verifies(tmp_path, capsys, monkeypatch):
    from cryptography import x509
    from ftte.edge.identity import load_identity
    from ftte.pipeline.deploy_config import load_allow_list, load_server_config
    from ftte.pipeline.deploy_task import build_task

    monkeypatch.chdir(tmp_path)
    code, cmds, err = init(tmp_path, capsys, "dep", "--devices", "4", "--port", "9443")
    assert code == 0, err
    d = tmp_path / "dep"
    settings = load_server_config(d / "server.toml")
    task = build_task(settings)  # the model fits the configured records: no "needs (C, 8, 8)"
    assert task.model is not None and settings.http.port == 9443 and settings.run.server.buffer_size == 4
    # the ledger key goes outside the state folder, into a private directory that exists
    key_path, state_path = settings.path(settings.deploy.ledger_key), settings.path(settings.deploy.state)
    assert key_path.parent != state_path.parent and key_path.parent.is_dir()
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
    # device identities in the keygen format, 0600, each on the allow-list
    allow = load_allow_list(settings.path(settings.deploy.allow_list))
    for i in range(4):
        f = d / "devices" / f"device{i}.key"
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert load_identity(f).public_key in allow
    assert len(allow) == 4
    # the server certificate verifies against the CA for the host devices use
    ctx = ssl.create_default_context(cafile=str(d / "pki" / "ca.pem"))
    assert ctx.cert_store_stats()["x509_ca"] == 1
    cert = x509.load_pem_x509_certificate((d / "pki" / "server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((d / "pki" / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    assert stat.S_IMODE((d / "pki" / "server-key.pem").stat().st_mode) == 0o600
    # sample data: raw digits, every row of the split used once, statistics of the training rows
    rows = 0
    for i in range(4):
        lines = (d / "data" / f"device{i}.csv").read_text().splitlines()
        assert lines[0].endswith(",label") and len(lines[0].split(",")) == 65
        rows += len(lines) - 1
    with np.load(d / "data" / "test.npz") as t:
        assert rows + len(t["y"]) == 1797 and t["x"].max() == 16.0  # raw pixel values
    assert len(task.feature_mean) == 64 and np.all(task.feature_std > 0)
    # the printed commands: the server, one per device, the audit, with this folder's paths
    assert cmds[0] == "ftte server --config dep/server.toml"
    assert len(cmds) == 6 and cmds[-1] == "ftte audit dep/state/server.db"
    for i, c in enumerate(cmds[1:5]):
        words = shlex.split(c)
        assert words[:2] == ["ftte", "edge"] and "https://127.0.0.1:9443" in words
        assert f"dep/devices/device{i}.key" in words and f"dep/data/device{i}.csv" in words
        assert "--min-cohort" not in words


def test_init_refuses_to_overwrite_and_small_fleets_get_a_matching_cohort_floor(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "server.toml").write_text("mine")
    code, _, err = init(tmp_path, capsys, "busy", "--devices", "3")
    assert code == 2 and "not an empty folder" in err
    assert (tmp_path / "busy" / "server.toml").read_text() == "mine"
    code, _, err = init(tmp_path, capsys, "one", "--devices", "1")
    assert code == 2 and ">= 2" in err
    code, cmds, err = init(tmp_path, capsys, "two", "--devices", "2", "--no-data")
    assert code == 0, err
    assert not (tmp_path / "two" / "data").exists()
    assert all("--min-cohort 2" in c and "YOUR_RECORDS.csv" in c for c in cmds[1:3])


def test_a_config_that_cannot_build_its_model_is_a_clean_error(tmp_path, capsys):
    cfg = tmp_path / "server.toml"
    (tmp_path / "devices.txt").write_text("00" * 32 + " d\n")
    cfg.write_text('[server]\nbuffer_size = 3\n[http]\nplaintext = true\n[deploy]\ninput_shape = [64]\n')
    assert cli.main(["server", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "needs (C, 28, 28)" in err and "ftte deploy init" in err
