#!/usr/bin/env python3
"""Compares two gateway profiles kept by `KEEP=1 benches/gateway/instructions.sh`,
function by function, in instructions per request.

Each run serves a different number of requests in its time, so a function's
self cost is divided by its run's request count (the `requests` column the
script prints) before the two are compared. Prints the total change, then the
functions that lost and gained most.

Usage:
  benches/gateway/cgdiff.py BEFORE_DIR BEFORE_REQUESTS AFTER_DIR AFTER_REQUESTS [TARGET] [N]
e.g.
  benches/gateway/cgdiff.py /tmp/flotilla-instr.AAA 15375 /tmp/flotilla-instr.BBB 18729 gw-plain 15

TARGET is the profile's name (gw-plain, gw-jwt-rl, nginx, raw-h1; default
gw-plain), N how many functions to print each way (default 15). Needs
valgrind's callgrind_annotate.
"""

import re
import subprocess
import sys

# The threads' entry points: their inclusive cost is the whole run.
ROOTS = ("clone", "start_thread", "thread_start", "call_once{{vtable")


def per_request(directory, requests, target):
    out = subprocess.run(
        [
            "callgrind_annotate",
            "--show=Ir",
            "--threshold=100",
            "--inclusive=no",
            f"{directory}/{target}.cg.1",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    costs = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*?)\s+\[", line)
        if not m or any(root in m.group(2) for root in ROOTS):
            continue
        name = m.group(2)
        costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", "")) / requests
    return costs


def main():
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    before = per_request(sys.argv[1], float(sys.argv[2]), sys.argv[5] if len(sys.argv) > 5 else "gw-plain")
    after = per_request(sys.argv[3], float(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else "gw-plain")
    n = int(sys.argv[6]) if len(sys.argv) > 6 else 15
    changes = sorted((after.get(k, 0) - before.get(k, 0), k) for k in set(before) | set(after))
    print(f"total change: {sum(c for c, _ in changes):+.1f} instructions per request")
    print(f"{'change':>9} {'before':>9} {'after':>9}  function")
    for change, name in changes[:n] + [(None, "...")] + changes[-n:]:
        if change is None:
            print("...")
            continue
        print(f"{change:+9.1f} {before.get(name, 0):9.1f} {after.get(name, 0):9.1f}  {name[-120:]}")


if __name__ == "__main__":
    main()
