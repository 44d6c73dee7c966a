#!/usr/bin/env python3
"""Memory under sustained load: the `flotilla` process's resident memory
while wrk drives the shop's gateway, sampled every few seconds.

A process that serves steadily should level off, not grow with the number
of requests it has served: growth that tracks the request count is memory
kept per request (it found the metrics recorder keeping every histogram
sample until a scrape of /metrics, about 26 bytes a request). The baseline
is the process itself, right after `flotilla up` is ready and the gateway
warmed: the figures are its RSS then, the most it reached, where it ended,
and the growth per million requests from the first sample under load to
the last (about zero for a process that has levelled off).

The requests go to a path no route matches, so that the gateway answers
them itself (404, JSON) and no service's cost is measured: what grows is
the gateway's and the runtime's own.

Usage: python3 benches/soak.py [--duration 30] [--every 5] [--connections 32]
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
    ap.add_argument("--no-build", action="store_true", help="use the release binaries as they are")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install -y wrk")
    if not args.no_build:
        foundation.build_release()

    up = foundation.Up(foundation.bench_manifest())
    try:
        pid = up.proc.pid
        url = up.gateway + "/soak/no-such-route"
        foundation.wrk(url, 1, args.connections)  # warm
        before = foundation.rss_kib(pid) / 1024
        print(f"ready and warm: flotilla RSS {before:.1f} MiB", flush=True)
        load = subprocess.Popen(
            ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", url],
            stdout=subprocess.PIPE, text=True)
        t0 = time.perf_counter()
        samples = []
        while load.poll() is None:
            time.sleep(args.every)
            if load.poll() is not None:
                break
            rss = foundation.rss_kib(pid) / 1024
            samples.append((time.perf_counter() - t0, rss))
            print(f"  t={samples[-1][0]:5.1f} s  RSS {rss:6.1f} MiB", flush=True)
        out = load.communicate()[0]
        after = foundation.rss_kib(pid) / 1024
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        if len(samples) < 2:
            sys.exit("too few samples: make --duration several times --every")
        # Growth per request from the first sample under load to the last,
        # over the requests sent between them (at wrk's mean rate).
        (t_first, first), (t_last, last) = samples[0], samples[-1]
        served = requests * (t_last - t_first) / args.duration
        growth = (last - first) / (served / 1e6) if served else 0.0
        peak = max(rss for _, rss in samples)
        print()
        print("| flotilla RSS | MiB |")
        print("|---|---|")
        print(f"| ready and warm (baseline) | {before:.1f} |")
        print(f"| most under load | {peak:.1f} ({peak / before:.2f}x of baseline) |")
        print(f"| after {requests} requests in {args.duration} s | {after:.1f} ({after / before:.2f}x of baseline) |")
        print(f"| growth per million requests, first to last sample under load | {growth:+.1f} |")
    finally:
        up.down()


if __name__ == "__main__":
    main()
