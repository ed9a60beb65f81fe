"""``ftte bench hostile``: how much memory and time a hostile request body costs the decoder.

A msgpack byte can become a 56-byte Python object (an empty array), so a decoder that
builds the object tree before looking at it turns a 16 MiB body into about a gigabyte.
This benchmark builds bodies shaped to hurt (nested empty arrays, deep nesting, a real
message header whose list field holds junk, a ``Submit`` wrapping junk) and decodes each
with :func:`ftte.wire.decode` **in a fresh child process**, reporting

* ``rss_growth_bytes``: the process's peak resident memory during the decode minus its
  resident memory just before (the peak is reset through ``/proc/self/clear_refs`` where
  the kernel allows it; otherwise ``ru_maxrss`` before and after is used, and the body is
  read from a file so that building it leaves no higher peak behind);
* ``seconds``: wall time of the decode (refusal included);
* ``refused``: whether :class:`~ftte.wire.WireError` was raised (it must be).

``--legacy-mib`` additionally decodes a smaller nested-array body with a plain
``msgpack.unpackb`` (what ``wire.decode`` used to do) for comparison; keep it small, since
that path grows by about 60 bytes per body byte.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1024 * 1024
CASES = ("nested_empty_arrays", "deep_nesting", "join_with_junk_pairs", "submit_wrapping_junk", "ids_of_arrays")


# -- hostile bodies ----------------------------------------------------------------------------

def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _bin(data: bytes) -> bytes:
    n = len(data)
    if n < 1 << 8:
        return b"\xc4" + bytes([n]) + data
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big") + data
    return b"\xc6" + n.to_bytes(4, "big") + data


def nested_empty_arrays(size: int) -> bytes:
    """``[[[], [], ...], [[], ...], ...]``: every inner list within msgpack's per-array limits."""
    inner = 65_535
    block = _array_header(inner) + b"\x90" * inner
    k = max(1, size // len(block))
    return _array_header(k) + block * k


def deep_nesting(size: int) -> bytes:
    """``[[[[...nil...]]]]`` as deep as the body allows."""
    return b"\x91" * (size - 1) + b"\xc0"


def _junk_items(n_bytes: int, max_items: int = 100_000) -> tuple[int, bytes]:
    """(count, bytes) of up to ``max_items`` items that are each a list of empty lists."""
    per = max(1, n_bytes // max_items)
    inner = max(0, per - 3)
    item = _array_header(inner) + b"\x90" * inner
    count = min(max_items, max(1, n_bytes // len(item)))
    return count, item * count


def join_with_junk_pairs(size: int) -> bytes:
    """A well-formed ``JoinRequest`` prefix whose ``unreported`` pairs hold nested junk."""
    from ftte import wire
    from ftte.deploy_messages import JoinRequest

    honest = JoinRequest("p" * 16, 1, b"h" * 32, 1, 0.01, 1.0, 1.0, "rdp", 1e-5, 0.0, "os", "t", "o", "f", 1, ())
    prefix = wire.encode(honest)[:-1]  # drop the empty `unreported` list (0x90)
    count, items = _junk_items(size - len(prefix) - 5)
    per = len(items) // count  # each pair: [1, <a list of empty lists>]
    pair = _array_header(2) + b"\x01" + items[:per]
    return prefix + _array_header(count) + pair * count


def submit_wrapping_junk(size: int) -> bytes:
    """A valid ``Submit`` (what a signed upload carries) whose payload is nested empty arrays."""
    from ftte import wire
    from ftte.deploy_messages import Submit

    return wire.encode(Submit("c" * 16, nested_empty_arrays(size - 64)))


def ids_of_arrays(size: int) -> bytes:
    """A ``SurvivorList`` header whose id list holds lists of empty lists instead of ids."""
    from ftte import wire
    from ftte.secagg_messages import SurvivorList

    prefix = wire.encode(SurvivorList(b"s" * 32, ()))[:-1]
    count, items = _junk_items(size - len(prefix) - 5)
    return prefix + _array_header(count) + items


BUILDERS = {name: globals()[name] for name in CASES}


# -- measuring, in a child process ---------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure_child(body_file: str, case: str, legacy: bool) -> dict:
    """Decode the body in ``body_file``; runs inside the child process."""
    import gc

    import msgpack

    from ftte import wire
    from ftte.deploy_messages import JoinRequest, Submit
    from ftte.secagg_messages import SurvivorList

    expect = {"join_with_junk_pairs": JoinRequest, "submit_wrapping_junk": Submit,
              "ids_of_arrays": SurvivorList}.get(case)
    body = Path(body_file).read_bytes()
    gc.collect()
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    refused, error = False, ""
    try:
        if legacy:
            msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True, max_bin_len=len(body),
                            max_str_len=64 * 1024, max_array_len=100_000, max_map_len=0, max_ext_len=0)
        else:
            msg = wire.decode(body, expect=expect, max_bytes=max(len(body), wire.MAX_MESSAGE_BYTES))
            if isinstance(msg, Submit):  # what the coordinator does next with an upload
                wire.decode(msg.payload)
    except (wire.WireError, ValueError) as exc:
        refused, error = True, str(exc)[:160]
    seconds = time.perf_counter() - t0
    if reset and rss_before is not None and _status_kib("VmHWM") is not None:
        growth_kib = _status_kib("VmHWM") - rss_before
        method = "VmHWM after clear_refs"
    else:
        growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - max(maxrss_before, rss_before or 0)
        method = "ru_maxrss"
    return {"case": case, "legacy_unpackb": legacy, "body_bytes": len(body), "refused": refused,
            "seconds": round(seconds, 4), "rss_growth_bytes": max(0, growth_kib) * 1024, "method": method,
            "error": error}


def run_case(case: str, mib: float, legacy: bool = False) -> dict:
    """Build one hostile body, then decode it in a fresh interpreter and return its figures."""
    body = BUILDERS[case](int(mib * MIB))
    with tempfile.NamedTemporaryFile(prefix="ftte-hostile-", suffix=".bin", delete=False) as fh:
        fh.write(body)
        path = fh.name
    del body
    try:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        out = subprocess.run([sys.executable, "-m", "ftte.bench.hostile_body", "--child", path, "--case", case]
                             + (["--legacy"] if legacy else []),
                             capture_output=True, text=True, timeout=600, env=env, check=False)
    finally:
        os.unlink(path)
    if out.returncode != 0:
        raise RuntimeError(f"child for {case} failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def honest_costs(repeats: int = 3) -> list[dict]:
    """What the bounded walk costs honest messages: median seconds of ``wire.decode`` against a
    bare ``msgpack.unpackb`` of the same bytes (which checks nothing)."""
    import statistics

    import msgpack
    import numpy as np

    from ftte import wire
    from ftte.secagg_messages import MaskedInput, SurvivorList

    messages = {
        "MaskedInput, 16e6 uint32 coordinates": MaskedInput(b"s" * 32, 2, np.arange(16_000_000, dtype=np.uint32),
                                                           b"g" * 64),
        "MaskedInput, 1M uint32 coordinates": MaskedInput(b"s" * 32, 2, np.arange(MIB, dtype=np.uint32), b"g" * 64),
        "SurvivorList, 100k 64-bit ids": SurvivorList(b"s" * 32, tuple(range(2**40, 2**40 + 100_000))),
        "SurvivorList, 100 ids": SurvivorList(b"s" * 32, tuple(range(100))),
    }
    out = []
    for name, msg in messages.items():
        data = wire.encode(msg)
        times = {"wire_decode_s": [], "unpackb_s": []}
        for _ in range(repeats):
            t0 = time.perf_counter()
            wire.decode(data)
            times["wire_decode_s"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            msgpack.unpackb(data, raw=False, max_bin_len=len(data), max_array_len=100_000)
            times["unpackb_s"].append(time.perf_counter() - t0)
        out.append({"message": name, "bytes": len(data),
                    **{k: round(statistics.median(v), 6) for k, v in times.items()}})
    return out


# -- command line ---------------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mib", type=float, default=16.0, help="size of each hostile body in MiB (default 16)")
    parser.add_argument("--case", choices=CASES, action="append", help="run only this case (repeatable)")
    parser.add_argument("--legacy-mib", type=float, default=0.0,
                        help="also decode a nested-array body of this size with plain msgpack.unpackb (the old "
                             "decoder), for comparison; 0 = skip (default)")
    parser.add_argument("--honest", action="store_true",
                        help="also time honest messages: wire.decode against a bare msgpack.unpackb")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--child", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--legacy", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.child:
        print(json.dumps(measure_child(args.child, args.case[0], args.legacy)), flush=True)
        return 0
    results = [run_case(case, args.mib) for case in (args.case or CASES)]
    if args.legacy_mib > 0:
        results.append(run_case("nested_empty_arrays", args.legacy_mib, legacy=True))
    honest = honest_costs() if args.honest else []
    if args.json:
        print(json.dumps({"mib": args.mib, "results": results, "honest": honest}, indent=2))
    else:
        for r in results:
            decoder = "msgpack.unpackb (old)" if r["legacy_unpackb"] else "wire.decode"
            print(f"{r['case']:<24} {decoder:<22} body {r['body_bytes'] / MIB:6.2f} MiB  "
                  f"refused={str(r['refused']):<5}  {r['seconds']:8.4f} s  "
                  f"peak RSS growth {r['rss_growth_bytes'] / MIB:8.2f} MiB  ({r['method']})")
        for h in honest:
            print(f"honest {h['message']:<38} {h['bytes'] / MIB:8.2f} MiB  wire.decode {h['wire_decode_s'] * 1e3:9.3f} ms"
                  f"  msgpack.unpackb {h['unpackb_s'] * 1e3:9.3f} ms")
    bad = [r for r in results if not r["legacy_unpackb"] and not r["refused"]]
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftte bench hostile", description=__doc__.splitlines()[0])
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
