#!/usr/bin/env python3
"""Run the whole interleaving matrix: every pair of operations, the first paused at each of its points.

For each ordered pair of create, delete, deploy, rollback, tx commit, tx
rollback, gc, gc --full, recover, mount and unmount, the first operation is
paused (``APT_LAYER_PAUSE``) at every fault point it passes, at the first hit
and the last, while the second runs; then the store is checked
(``tests/interleave.py`` says what is checked and how). Prints one line per
case: the pair, the point, the outcome, the two exit codes, whether the
second had to wait for the first, the seconds; then every failure with what
broke. Mount and unmount pairs need root, erofs and overlayfs and are
skipped, with the reason, where those are missing.

Example::

    tools/interleave.py                              # the full matrix
    tools/interleave.py --first delete --second create,deploy
    tools/interleave.py --json --keep /tmp/failed    # stores of failed cases kept there

Exit status 0 if every case passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from interleave import OPS, Harness, mount_unsupported, needs_mounts  # noqa: E402


def _ops(text: str | None) -> list[str]:
    if text is None:
        return list(OPS)
    ops = [o.strip() for o in text.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise SystemExit(f"unknown operations {unknown}; known: {', '.join(OPS)}")
    return ops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--first", help="comma-separated operations paused first (default: all)")
    parser.add_argument("--second", help="comma-separated operations run second (default: all)")
    parser.add_argument("--workdir", type=Path, default=None, help="where stores live (default: a temp dir)")
    parser.add_argument("--keep", type=Path, default=None, help="copy the store of every failed case here")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="apt-layer-interleave-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    no_mounts = mount_unsupported()
    start = time.monotonic()
    harness = Harness(workdir)
    results, skipped = [], []
    for first in _ops(args.first):
        for second in _ops(args.second):
            if no_mounts and needs_mounts(first, second):
                skipped.append(f"{first}+{second}: {no_mounts}")
                continue
            for case in harness.cases(first, second):
                result = harness.run(case, keep=args.keep)
                results.append(result)
                if not args.json:
                    print(f"{case.pair:24} {case.point + ':' + str(case.nth):32} {result.outcome:9} "
                          f"{str(result.codes[0]):>4} {str(result.codes[1]):>4} "
                          f"{'waited' if result.waited else '':6} {result.seconds:6.2f}", flush=True)
    seconds = time.monotonic() - start
    failed = [r for r in results if r.outcome != "ok"]
    if args.json:
        print(json.dumps({"seconds": round(seconds, 1), "cases": len(results), "skipped": skipped,
                          "results": [{"pair": r.case.pair, "point": f"{r.case.point}:{r.case.nth}",
                                       "outcome": r.outcome, "exits": list(r.codes), "waited": r.waited,
                                       "seconds": round(r.seconds, 2), "problems": r.problems}
                                      for r in results]}, indent=2))
    else:
        print(f"\n{len(results)} cases, {len(failed)} failed, {len(skipped)} pairs skipped, {seconds:.0f} s")
        for line in skipped:
            print(f"skipped {line}")
        for r in failed:
            print(f"\n{r.outcome} {r.case.id} (exits {r.codes[0]}, {r.codes[1]})")
            for p in r.problems:
                print(f"    {p}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
