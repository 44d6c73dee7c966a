#!/usr/bin/env python3
"""Memory under sustained load: the resident memory of the `flotilla`
process and of every instance of the shop while wrk drives the gateway,
sampled every few seconds.

A process that serves steadily should level off, not grow with the number
of requests it has served: growth that tracks the request count is memory
kept per request (it found the metrics recorder keeping every histogram
sample until a scrape of /metrics, about 20 bytes a request). The baseline
is the process itself, right after `flotilla up` is ready and the gateway
warmed: the figures are its RSS then, the most it reached, where it ended,
and the growth per million requests from the first sample under load to
the last (about zero for a process that has levelled off).

By default the requests go to a path no route matches, so that the
gateway answers them itself (404, JSON) and only the gateway's and the
runtime's own memory is exercised; `--path /api/catalog/products?limit=5`
takes them through the gateway's mTLS upstream pool to the catalog and its
database as well.

Usage: python3 benches/soak.py [--duration 30] [--every 5] [--connections 32]
       [--path PATH]
Needs: cargo, wrk (apt-get install wrk). Takes --duration plus the
shop's start and stop (and, without --no-build, the release build).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import foundation  # noqa: E402  (beside this file)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=30)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--path", default="/soak/no-such-route")
    ap.add_argument("--no-build", action="store_true", help="use the release binaries as they are")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install -y wrk")
    if args.duration < 2 * args.every:
        sys.exit("--duration must be at least twice --every: growth needs two samples under load")
    if not args.no_build:
        foundation.build_release()

    up = foundation.Up(foundation.bench_manifest())
    try:
        url = up.gateway + args.path
        foundation.wrk(url, 1, args.connections)  # warm
        procs = [("flotilla", up.proc.pid)] + [
            (f"{s['name']}#{n}", i["pid"])
            for s in up.status()["services"]
            for n, i in enumerate(s["instances"]) if i.get("pid")]

        def rss():
            return {name: foundation.rss_kib(pid) / 1024 for name, pid in procs}

        before = rss()
        print(f"ready and warm: flotilla RSS {before['flotilla']:.1f} MiB, "
              f"{len(procs)} processes {sum(before.values()):.1f} MiB", flush=True)
        load = subprocess.Popen(
            ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", url],
            stdout=subprocess.PIPE, text=True)
        t0 = time.perf_counter()
        samples = []
        while True:
            time.sleep(args.every)
            if load.poll() is not None:
                break
            samples.append((time.perf_counter() - t0, rss()))
            now = samples[-1][1]
            print(f"  t={samples[-1][0]:5.1f} s  flotilla {now['flotilla']:6.1f} MiB, "
                  f"all {sum(now.values()):6.1f} MiB", flush=True)
        out = load.communicate()[0]
        after = rss()
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if len(samples) < 2:
            sys.exit("too few samples under load: make --duration several times --every")
        # Growth from the first sample under load to the last, over the
        # requests sent between them (at wrk's mean rate).
        (t_first, first), (t_last, last) = samples[0], samples[-1]
        served_m = requests * (t_last - t_first) / args.duration / 1e6
        print()
        print(f"{requests} requests to {args.path} in {args.duration} s"
              + (f" ({errors.group(1)} not 2xx/3xx)" if errors else ""))
        print()
        print("| process | ready and warm (MiB) | most under load | after | growth per million requests |")
        print("|---|---|---|---|---|")
        for name, _ in procs:
            if not before[name]:
                continue
            peak = max(sample[name] for _, sample in samples)
            growth = (last[name] - first[name]) / served_m if served_m else 0.0
            print(f"| {name} | {before[name]:.1f} | {peak:.1f} ({peak / before[name]:.2f}x) "
                  f"| {after[name]:.1f} ({after[name] / before[name]:.2f}x) | {growth:+.2f} MiB |")
    finally:
        up.down()


if __name__ == "__main__":
    main()
