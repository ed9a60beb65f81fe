"""``ftte bench secagg --compare flower``: Flower 1.41.0's SecAgg+ building blocks next to ours."""

from __future__ import annotations

import json
import math
import sys

import pytest

from ftte.cli import main

NEEDS_FLOWER = "Flower is not installed: `make compare-flower` or `pip install 'ftte[flower]'` (flwr==1.41.0)"


def _flower_available() -> bool:
    try:
        from ftte.bench.flower_ref import load_flower

        load_flower()
    except ImportError:
        return False
    return True


requires_flower = pytest.mark.skipif(not _flower_available(), reason=NEEDS_FLOWER)

RATIOS = ("mask_speedup", "mask_speedup_excl_quantize", "unmask_speedup", "unmask_speedup_excl_dequantize")
TIMES = ("flower_client_mask_s", "flower_server_unmask_s", "client_mask_s", "server_unmask_s")


def _run(capsys, *extra: str) -> dict:
    argv = ["bench", "secagg", "--clients", "10", "--dim", "10000", "--dropout", "0.1", "--compare", "flower", "--json", *extra]
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


@requires_flower
@pytest.mark.parametrize("graph", [(), ("--graph", "ring", "--neighbors", "4")], ids=["full", "ring4"])
def test_compare_flower_small_cohort(capsys, graph) -> None:
    out = _run(capsys, *graph)
    assert out["flower_version"] == "1.41.0"
    assert out["exact"] is True
    assert out["flower_exact"] is True
    assert out["survivors"] == 9 and out["dropped"] == 1
    for key in RATIOS + TIMES:
        value = out[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert out["flower_client_quantize_s"] < out["flower_client_mask_s"]
    # Flower ships int64 masked vectors (np.save), ours ring elements of the 16-bit ring.
    assert out["ring_bits"] == 16 and out["vector_bytes_per_coordinate"] == 2
    assert out["flower_vector_bytes_per_coordinate"] >= 8
    assert out["ours_masked_upload_bytes_per_coordinate"] < 2.05
    assert out["flower_bytes_up_per_client"] > out["bytes_up_per_client"]
    assert "client_mask_s" in out["timing_notes"]


def test_missing_flower_gives_install_hint(monkeypatch, capsys) -> None:
    # A None entry makes `import flwr` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "flwr", None)
    from ftte.bench.flower_ref import load_flower

    with pytest.raises(ImportError, match="make compare-flower"):
        load_flower()
    rc = main(["bench", "secagg", "--clients", "3", "--dim", "16", "--dropout", "0", "--compare", "flower", "--json"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "pip install 'ftte[flower]'" in err
