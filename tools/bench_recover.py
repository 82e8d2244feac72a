#!/usr/bin/env python3
"""Boot-time cost of a no-op ``apt-layer recover`` on a large journal.

Builds a store whose journal holds >= 100,000 events (two images deployed and
rolled back and forth), runs ``recover`` once to settle it, then times N
no-op runs of ``python -m aptlayer recover`` against N runs of a bare
``python -c pass`` with the same interpreter, bytecode compiled as on an
installed system. Prints a table; the goal is at most 60 ms over bare.

Usage: tools/bench_recover.py [--events N] [--runs N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aptlayer.layout import new_id as new_tx_id  # noqa: E402
from aptlayer.store import CreateOptions, Store  # noqa: E402


def build(root: Path, events: int) -> int:
    tree = root.parent / "tree"
    (tree / "etc").mkdir(parents=True, exist_ok=True)
    (tree / "etc" / "os-release").write_text("ID=demo\n" * 20)
    store = Store.open(root)
    opts = CreateOptions(backend="python")
    for name in ("a", "b"):
        store.create(str(tree), name, opts)
    store.deploy("a")
    store.deploy("b")
    j = store.journal
    while j.last_seq() < events:
        with j.transaction() as w:
            for _ in range(2000):
                deps = j.deployments()
                tx = new_tx_id()
                w.append("tx.begun", tx, {"explicit": False, "boot_id": store.boot_id, "op": "rollback"}, tx)
                w.append("rolled-back", deps["previous"]["image"], {"current": deps["previous"],
                                                                     "previous": deps["current"]}, tx)
                w.append("tx.committed", tx, {"ops": 1}, tx)
    store.links.sync()
    count = j.last_seq()
    store.close()
    return count


def timed(cmd: list[str], runs: int, env: dict) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--keep", type=Path)
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "aptlayer")], check=True, env=env)
    with tempfile.TemporaryDirectory() as tmp:
        root = (args.keep or Path(tmp)) / "store"
        t = time.perf_counter()
        count = build(root, args.events)
        build_s = time.perf_counter() - t
        env["PYTHONPATH"] = str(REPO)
        recover = [sys.executable, "-m", "aptlayer", "--quiet", "--root", str(root), "recover"]
        subprocess.run(recover, check=True, env=env, stdout=subprocess.DEVNULL)  # settle: first verify
        bare = timed([sys.executable, "-c", "pass"], args.runs, env)
        noop = timed(recover, args.runs, env)
    b, r = statistics.median(bare), statistics.median(noop)
    print(f"journal: {count} events (built in {build_s:.1f} s); {args.runs} runs each, median")
    print(f"{'command':34} {'median ms':>10} {'min ms':>8}")
    print(f"{'python3 -c pass':34} {b:10.1f} {min(bare):8.1f}")
    print(f"{'apt-layer recover (no-op)':34} {r:10.1f} {min(noop):8.1f}")
    print(f"{'overhead over bare python':34} {r - b:10.1f} {'':8}  goal <= 60 ms: {'met' if r - b <= 60 else 'MISSED'}")


if __name__ == "__main__":
    main()
