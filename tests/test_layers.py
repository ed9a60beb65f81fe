"""The one-way import rules between the layers, checked on every module (function-level imports included).

ftte (codec, messages) <- crypto <- privacy <- protocol <- edge <- pipeline <- bench. A lower
layer never imports a higher one, so the device never needs the server's code, the
secure-aggregation core never needs deployment types, and the deployment server never loads
the simulator.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# layer folder -> ftte modules (prefixes) it may import
ALLOWED = {
    "crypto": ("ftte.crypto", "ftte.wire", "ftte.secagg_messages"),
    "privacy": ("ftte.privacy", "ftte.wire", "ftte.crypto"),
    "protocol": ("ftte.protocol", "ftte.crypto", "ftte.privacy", "ftte.wire", "ftte.secagg_messages",
                 "ftte.round_messages", "ftte.deploy_messages"),
    "edge": ("ftte.edge", "ftte.protocol", "ftte.crypto", "ftte.privacy", "ftte.wire", "ftte.secagg_messages",
             "ftte.round_messages", "ftte.deploy_messages", "ftte.http_auth", "ftte.__version__", "ftte"),
}
# modules of the ftte/ folder that every layer may use, and what they may import themselves
FTTE_CORE = {"wire.py": ("ftte.wire",), "secagg_messages.py": ("ftte.wire",), "round_messages.py": ("ftte.wire",),
             "deploy_messages.py": ("ftte.wire",), "http_auth.py": ("ftte.wire",)}


def ftte_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name == "ftte" or a.name.startswith("ftte.")]
        elif isinstance(node, ast.ImportFrom) and node.module and (node.module == "ftte"
                                                                    or node.module.startswith("ftte.")):
            if node.module == "ftte":
                out += [(node.lineno, f"ftte.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 1:
            pytest.fail(f"{path}: an import reaching out of its package hides the layer it comes from "
                        f"(line {node.lineno})")
    return out


def allowed(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_layers_below_it(layer):
    bad = []
    for path in sorted((ROOT / layer).glob("*.py")):
        for line, name in ftte_imports(path):
            if not allowed(name, ALLOWED[layer]):
                bad.append(f"{layer}/{path.name}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_wire_messages_depend_on_the_codec_only():
    bad = []
    for fname, prefixes in FTTE_CORE.items():
        for line, name in ftte_imports(ROOT / "ftte" / fname):
            if not allowed(name, prefixes):
                bad.append(f"ftte/{fname}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def loaded_after(statement: str, watch: tuple[str, ...]) -> list[str]:
    code = f"import sys; {statement}; print(sorted(m for m in {watch!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return eval(out.stdout.strip())  # a list literal printed by the child


def test_the_deployment_server_does_not_load_the_simulator():
    pytest.importorskip("starlette")
    watch = ("ftte.pipeline.simulator", "ftte.pipeline.fleet", "ftte.pipeline.backends", "ftte.pipeline.cohort",
             "ftte.pipeline.datasets", "ray")
    assert loaded_after("import ftte.pipeline.http_server, ftte.pipeline.server_cli, ftte.pipeline.deploy_task", watch) == []


def test_the_secure_aggregation_core_loads_no_torch_and_no_deployment_types():
    watch = ("torch", "opacus", "ftte.deploy_messages", "ftte.round_messages", "ftte.edge", "ftte.pipeline")
    assert loaded_after("import ftte.crypto.secagg_local, ftte.crypto.secagg_member", watch) == []
