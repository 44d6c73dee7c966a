#!/usr/bin/env python3
"""Foundation figures for the shop, each against a named baseline.

  1. `flotilla up` to ready (build already done): wall time, median of N runs.
  2. A function's cold start through the gateway (zero instances -> first
     response) against the same request warm: p50 and the ratio.
  3. Warm gateway overhead: wrk through the gateway against wrk straight to
     the instance, same request: requests/s, p50/p99 and the ratios.
  4. Resident memory of the whole running shop (flotilla + every instance).

Usage: python3 benches/foundation.py [--runs 5] [--cold 20] [--duration 5]
       [--flotilla PATH]  (another build of the CLI, e.g. target/pgo/flotilla
       from benches/gateway/pgo.sh; the services are still built --release)
Needs: cargo, wrk (apt-get install wrk). Prints a summary table at the end.
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOP = os.path.join(ROOT, "examples", "shop", "flotilla.toml")
FLOTILLA = os.path.join(ROOT, "target", "release", "flotilla")


def sh(*args, **kw):
    return subprocess.run(args, check=True, cwd=ROOT, **kw)


def bench_manifest():
    """The shop with a 1 s idle for pricing (so cold starts repeat quickly)
    and one catalog replica (so gateway and direct runs hit one instance)."""
    text = open(SHOP).read()
    text = text.replace('idle = "30s"', 'idle = "1s"').replace("replicas = 2", "replicas = 1")
    text = text.replace('static = "web"', 'static = "../../examples/shop/web"')
    # Commands run relative to the manifest, which moves to target/bench.
    text = text.replace('"services/reviews/app.py"', '"../../examples/shop/services/reviews/app.py"')
    d = os.path.join(ROOT, "target", "bench")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "flotilla.toml")
    open(path, "w").write(text)
    return path


class Up:
    def __init__(self, manifest):
        self.data = tempfile.mkdtemp(prefix="flotilla-bench-")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [FLOTILLA, "up", manifest, "--data-dir", self.data, "--listen", "127.0.0.1:0", "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for line in self.proc.stdout:
            if line.startswith("ready:"):
                self.ready_s = time.perf_counter() - self.t0
                self.ready_line = line.strip()
                break
        else:
            raise SystemExit("flotilla up exited before ready:\n" + self.proc.stderr.read())
        self.endpoints = json.load(open(os.path.join(self.data, "endpoints.json")))
        self.gateway = self.endpoints["gateway"]

    def status(self):
        # The control API answers only the operator identity: ask the CLI.
        out = subprocess.run([FLOTILLA, "status", "--json", "--data-dir", self.data],
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout
        return json.loads(out)

    def service(self, name):
        return next(s for s in self.status()["services"] if s["name"] == name)

    def down(self):
        subprocess.run([FLOTILLA, "down", "--data-dir", self.data], cwd=ROOT, capture_output=True)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.data, ignore_errors=True)


def build_release():
    """`flotilla` and every Rust service of the shop, so that the first
    `up` measures starting, not building."""
    print("building (release) ...", flush=True)
    services = sorted(
        d for d in os.listdir(os.path.join(ROOT, "examples", "shop", "services"))
        if os.path.exists(os.path.join(ROOT, "examples", "shop", "services", d, "Cargo.toml")))
    packages = [a for d in services for a in ("-p", f"shop-{d}")]
    # Two builds, as `cargo run --release -- up` makes them: built in one
    # command, cargo unifies the features of the dependencies `flotilla`
    # and the services share, so the services' own build in `up` (without
    # `flotilla`) found nothing it could reuse and the first `up` spent
    # four minutes building them again.
    sh("cargo", "build", "--release", "-q", "-p", "flotilla")
    sh("cargo", "build", "--release", "-q", *packages)


def post(url, body):
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()
        assert r.status == 200, r.status
    return time.perf_counter() - t0


def rss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def wrk(url, duration, connections):
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    def lat(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50": lat(50), "p99": lat(99), "non2xx": int(errors.group(1)) if errors else 0}


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cold", type=int, default=20)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--no-build", action="store_true", help="use the release binaries as they are")
    ap.add_argument("--flotilla", help="the flotilla binary to run [default: target/release/flotilla]")
    args = ap.parse_args()
    if args.flotilla:
        global FLOTILLA
        FLOTILLA = os.path.abspath(args.flotilla)
        if not os.access(FLOTILLA, os.X_OK):
            sys.exit(f"--flotilla {args.flotilla}: not an executable file")
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install -y wrk")

    if not args.no_build:
        build_release()
    results = {}

    # 1 + 4: startup and memory of the real shop.
    times, rss = [], []
    for i in range(args.runs):
        up = Up(SHOP)
        times.append(up.ready_s)
        print(f"  up #{i + 1}: ready in {up.ready_s * 1000:.0f} ms  ({up.ready_line})", flush=True)
        if i == 0:
            products = json.load(urllib.request.urlopen(up.gateway + "/api/catalog/products?limit=1"))
            items = products if isinstance(products, list) else products.get("products", products.get("items"))
            p = items[0]
            post(up.gateway + "/api/pricing/quote", {"items": [{"sku": p["id"], "quantity": 1, "unit_price_cents": p["price_cents"]}], "currency": "EUR"})
            procs = [("flotilla", up.proc.pid)] + [
                (s["name"], i["pid"]) for s in up.status()["services"] for i in s["instances"] if i.get("pid")]
            rss.append(sum(rss_kib(p) for _, p in procs) / 1024)
            print(f"  memory: {len(procs)} processes, {rss[0]:.1f} MiB RSS in all:", flush=True)
            for name, p in procs:
                print(f"    {name:14} {rss_kib(p) / 1024:6.1f} MiB", flush=True)
        up.down()
    results["up_ready_ms_median"] = statistics.median(times) * 1000

    # 2 + 3 on the bench manifest.
    up = Up(bench_manifest())
    try:
        products = json.load(urllib.request.urlopen(up.gateway + "/api/catalog/products?limit=1"))
        items = products if isinstance(products, list) else products.get("products", products.get("items"))
        p = items[0]
        quote = {"items": [{"sku": p["id"], "quantity": 2, "unit_price_cents": p["price_cents"]}], "currency": "EUR"}
        cold, warm = [], []
        for i in range(args.cold):
            deadline = time.time() + 30
            while up.service("pricing")["instances"]:
                if time.time() > deadline:
                    sys.exit("pricing did not scale to zero within 30 s")
                time.sleep(0.05)
            cold.append(post(up.gateway + "/api/pricing/quote", quote) * 1000)
            warm.append(post(up.gateway + "/api/pricing/quote", quote) * 1000)
        results["cold_p50_ms"] = statistics.median(cold)
        results["cold_p90_ms"] = pct(cold, 90)
        results["warm_p50_ms"] = statistics.median(warm)
        print(f"  cold start: p50 {results['cold_p50_ms']:.1f} ms, p90 {results['cold_p90_ms']:.1f} ms; warm p50 {results['warm_p50_ms']:.2f} ms", flush=True)

        catalog = up.service("catalog")["instances"][0]
        # The list, not a product page: a page also calls the (Python)
        # reviews service, which would measure that instead of the gateway.
        path = "/api/catalog/products?limit=5"
        gw_url = up.gateway + path
        wrk(gw_url, 1, args.connections)  # warm
        results["gateway"] = wrk(gw_url, args.duration, args.connections)
        # Instances accept only mutual TLS, which wrk cannot present; the
        # direct baseline needs a plaintext instance, so it is measured only
        # when the manifest runs one (see docs/benchmarks.md).
        if not up.endpoints["services"]["catalog"]["address"].startswith("https://"):
            direct_url = "http://" + catalog["address"] + path
            wrk(direct_url, 1, args.connections)
            results["direct"] = wrk(direct_url, args.duration, args.connections)
    finally:
        up.down()

    g = results["gateway"]
    d = results.get("direct")
    print()
    print("| measure | value | baseline | ratio |")
    print("|---|---|---|---|")
    print(f"| `flotilla up` to ready (shop, build done), median of {args.runs} | {results['up_ready_ms_median']:.0f} ms | target 2000 ms | {results['up_ready_ms_median'] / 2000:.2f}x of target |")
    print(f"| function cold start via gateway, p50 of {args.cold} | {results['cold_p50_ms']:.1f} ms | warm p50 {results['warm_p50_ms']:.2f} ms | {results['cold_p50_ms'] / results['warm_p50_ms']:.1f}x warm |")
    if d:
        print(f"| catalog GET requests/s ({args.connections} conns, {args.duration}s) | gateway {g['rps']:.0f} | direct {d['rps']:.0f} | {g['rps'] / d['rps']:.2f}x direct |")
        print(f"| catalog GET p50 latency | gateway {g['p50']:.2f} ms | direct {d['p50']:.2f} ms | +{g['p50'] - d['p50']:.2f} ms |")
        print(f"| catalog GET p99 latency | gateway {g['p99']:.2f} ms | direct {d['p99']:.2f} ms | +{g['p99'] - d['p99']:.2f} ms |")
    else:
        print(f"| catalog GET through the gateway, mTLS upstream ({args.connections} conns, {args.duration}s) | {g['rps']:.0f} req/s, p50 {g['p50']:.2f} ms, p99 {g['p99']:.2f} ms | instances are mTLS-only: no plaintext direct run | — |")
    print(f"| RSS of the running shop (flotilla + instances) | {rss[0]:.1f} MiB | target 150 MB | {rss[0] * 1.048576 / 150:.2f}x of target |")
    if g["non2xx"] or (d and d["non2xx"]):
        print(f"warning: non-2xx responses: gateway {g['non2xx']}, direct {d['non2xx'] if d else 0}")


if __name__ == "__main__":
    main()
