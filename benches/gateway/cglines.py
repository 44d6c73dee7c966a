#!/usr/bin/env python3
"""Where a gateway profile kept by `KEEP=1 benches/gateway/instructions.sh`
spends its instructions, line by line: each source line's own cost and each
call site's (the callee's inclusive cost), per request.

`cgdiff.py` compares two runs function by function; inside one function of
a few thousand instructions (`Outbound::send`, everything inlined into it)
that says little. With line tables in the release build the profile names
the source line of every instruction, inlined code included:

  CARGO_PROFILE_RELEASE_DEBUG=line-tables-only KEEP=1 benches/gateway/instructions.sh
  benches/gateway/cglines.py /tmp/flotilla-instr.XXX/gw-jwt-rl.cg.1 REQUESTS [N] [FUNCTION]

REQUESTS is the run's `requests` column for that target; N how many lines
and call sites to print (default 40); FUNCTION, a part of a function's name,
keeps only what that function (with what is inlined into it) costs. Line
tables do not change the code (the same counts to within 0.2 % here).

EVENT=NAME counts another of the profile's events instead of instructions
(Ir): with `CACHE=1` in the run, I1mr (L1 instruction-cache misses), D1mr
and D1mw (L1 data-cache read and write misses) or Bcm (mispredicted
conditional branches). EVENT=I1mr BY=crate sums them by crate (or BY=file
by source file) instead of listing lines.

Compare runs whose request counts are alike: the counts per request include
work that goes by time, not by request (the metrics' upkeep thread, timers),
so a run the machine slowed (fewer requests in its time) reads higher.
"""

import collections
import os
import re
import sys


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    path, requests = sys.argv[1], float(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    only = sys.argv[4] if len(sys.argv) > 4 else None
    # callgrind's name compression: "(id) name" the first time, "(id)" after.
    names = {"fl": {}, "fn": {}}

    def name(kind, text):
        m = re.match(r"\((\d+)\)(?: (.*))?", text)
        if not m:
            return text
        table = names[kind]
        if m.group(2) is not None:
            table[m.group(1)] = m.group(2)
        return table.get(m.group(1), "?")

    event = os.environ.get("EVENT", "Ir")
    column = None
    own = collections.Counter()
    calls = collections.Counter()
    count = collections.Counter()
    file = inlined = function = callee = None
    last, pending = 0, None
    with open(path, errors="replace") as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not line:
                continue
            if line.startswith("events:"):
                events = line.split()[1:]
                if event not in events:
                    sys.exit(f"{path} has no {event} event; it has {' '.join(events)}")
                column = 1 + events.index(event)
                continue
            c = line[0]
            if c.isdigit() or c in "+-*":
                parts = line.split()
                pos = parts[0]
                # Positions may be relative to the last one.
                if pos == "*":
                    at = last
                elif pos[0] in "+-":
                    at = last + int(pos)
                else:
                    at = int(pos)
                last = at
                cost = int(parts[column]) if len(parts) > column else 0
                where = inlined or file
                if pending is not None:
                    key = (function, where, at, callee)
                    calls[key] += cost
                    count[key] += pending
                    pending = None
                else:
                    own[(function, where, at)] += cost
                continue
            if "=" not in line:
                continue
            key, value = line.split("=", 1)
            if key == "fl":
                file, inlined = name("fl", value), None
            elif key in ("fi", "fe"):
                inlined = name("fl", value)
            elif key == "fn":
                function, inlined = name("fn", value), None
            elif key == "cfn":
                callee = name("fn", value)
            elif key in ("cfi", "cfl"):
                name("fl", value)
            elif key == "calls":
                pending = int(value.split()[0])

    def short(f):
        return re.sub(r".*/(registry/src/[^/]+/|rustc/[0-9a-f]+/library/|crates/)", "", f or "?")

    def kept(fn):
        return only is None or only in (fn or "")

    by = os.environ.get("BY")
    if by:
        # Own costs only: the calls' inclusive costs would count them twice.
        totals = collections.Counter()
        for (fn, f, _), cost in own.items():
            if not kept(fn):
                continue
            where = short(f)
            if by == "crate":
                # glibc's sources are named relative to its build ("./string/...").
                where = "glibc" if where.startswith("./") else re.sub(r"^([^/]+)/.*", r"\1", where)
            totals[where] += cost
        whole = sum(totals.values())
        print(f"{event} per request by {by}, own (inlined code where its source is): {whole / requests:.1f}")
        for where, cost in totals.most_common(top):
            print(f"{cost / requests:8.1f} {100 * cost / whole:5.1f} %  {where}")
        return

    print(f"{event} per request, each line's own (inlined code at its own line):")
    for cost, (fn, f, at) in sorted(((v, k) for k, v in own.items() if kept(k[0])), reverse=True)[:top]:
        print(f"{cost / requests:8.1f}  {short(f)}:{at}  [{(fn or '')[-60:]}]")
    print(f"call sites: the callee's inclusive {event} per request, calls per request:")
    for cost, key in sorted(((v, k) for k, v in calls.items() if kept(k[0])), reverse=True)[:top]:
        fn, f, at, cf = key
        print(f"{cost / requests:8.1f} {count[key] / requests:5.2f}x  {short(f)}:{at} -> {cf[-70:]}  [{(fn or '')[-40:]}]")


if __name__ == "__main__":
    main()
