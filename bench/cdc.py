#!/usr/bin/env python3
"""Change data capture under a steady write rate: events/s and commit-to-delivery lag per sink.

Against a running `causeway dev` (its API and its cdc service's admin API): a local webhook
receiver (Standard Webhooks signatures checked) fed by a feed of the cdc service, and a reader of
the api-server's change stream (SSE), both on the `bench` collection; then `causeway bench`
writes at RATE for DURATION seconds (open loop). The lag of an event is the time it arrived minus
its `time` (the record's wall clock, set by the api-server when it took the write), so it holds
the cluster's visibility lag too: the run's visibility lag (from `causeway bench`) is printed
beside it. With --kafka, a third feed writes into Kafka topics (exactly once): its lag is the cdc
service's own histogram, commit to the Kafka transaction's commit
(`causeway_cdc_delivery_lag_ms`, read as bucket bounds); the webhook feed's is printed beside it
the same way. Prints Markdown tables. Every server listens on 127.0.0.1; every wait is bounded.

    python3 bench/cdc.py --api URL --token T --cdc URL --causeway BIN [--kafka HOST:PORT]
                         [--rate 500] [--duration 15]
"""

import argparse
import base64
import datetime
import hashlib
import hmac
import http.server
import json
import subprocess
import sys
import threading
import time
import urllib.request

SECRET = "whsec_" + base64.b64encode(b"causeway-bench-webhook-key-0123").decode()


def event_time(text):
    """Seconds since the epoch of a CloudEvents `time` (RFC 3339, UTC, milliseconds)."""
    t = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
    return t.replace(tzinfo=datetime.timezone.utc).timestamp()


class Arrivals:
    """Change events of one sink: their ids and lags, in arrival order."""

    def __init__(self, name):
        self.name = name
        self.lock = threading.Lock()
        self.ids = set()
        self.lags = []
        self.first = None
        self.last = None
        self.bad = 0

    def take(self, event, now):
        if not event.get("type", "").startswith("causeway.document."):
            return
        with self.lock:
            if event["id"] in self.ids:
                return
            self.ids.add(event["id"])
            self.lags.append(now - event_time(event["time"]))
            self.first = self.first or now
            self.last = now

    def count(self):
        with self.lock:
            return len(self.ids)


def receiver(arrivals, key):
    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            now = time.time()
            signed = f"{self.headers['webhook-id']}.{self.headers['webhook-timestamp']}.".encode() + body
            mac = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
            if f"v1,{mac}" not in self.headers.get("webhook-signature", "").split(" "):
                arrivals.bad += 1
                self.send_response(401)
                self.end_headers()
                return
            for event in json.loads(body):
                arrivals.take(event, now)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def sse_reader(url, token, arrivals, stop):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=60) as stream:
        data = []
        for raw in stream:
            now = time.time()
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and data:
                arrivals.take(json.loads("\n".join(data)), now)
                data = []
            if stop.is_set():
                return


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def create_feed(cdc, token, feed):
    request = urllib.request.Request(
        f"{cdc}/v1/feeds", data=json.dumps(feed).encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=60).read()
    deadline = time.time() + 60
    while time.time() < deadline:
        state = json.load(urllib.request.urlopen(f"{cdc}/v1/feeds/{feed['name']}", timeout=10))
        if state["status"]["state"] == "running":
            return
        time.sleep(0.2)
    raise SystemExit(f"feed {feed['name']} did not start: {state}")


def feed_histogram(cdc, feed):
    """(change events, p50, p99) of a feed's delivery lag histogram, as bucket upper bounds."""
    text = urllib.request.urlopen(f"{cdc}/metrics", timeout=10).read().decode()
    buckets = []
    for line in text.splitlines():
        prefix = f'causeway_cdc_delivery_lag_ms_bucket{{feed="{feed}",le="'
        if line.startswith(prefix):
            le, count = line[len(prefix):].split('"} ')
            buckets.append((float("inf") if le == "+Inf" else float(le), int(count)))
    total = buckets[-1][1] if buckets else 0
    bound = lambda q: next((le for le, c in buckets if c >= q * total), float("nan"))
    return total, bound(0.5), bound(0.99)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--api", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--cdc", required=True)
    ap.add_argument("--causeway", required=True)
    ap.add_argument("--rate", type=int, default=500)
    ap.add_argument("--duration", type=int, default=15)
    ap.add_argument("--keys", type=int, default=10000)
    ap.add_argument("--kafka", help="a Kafka broker for a third feed")
    args = ap.parse_args()

    hook, sse = Arrivals("webhook"), Arrivals("SSE")
    server = receiver(hook, base64.b64decode(SECRET[len("whsec_"):]))
    feed = {
        "name": "bench-hook",
        "collections": ["bench"],
        "sink": {"type": "webhook", "url": f"http://127.0.0.1:{server.server_port}/hook",
                 "secrets": [SECRET]},
    }
    create_feed(args.cdc, args.token, feed)
    if args.kafka:
        create_feed(args.cdc, args.token, {
            "name": "bench-kafka", "collections": ["bench"],
            "sink": {"type": "kafka", "bootstrap_servers": args.kafka,
                     "topic_prefix": "bench-cdc."}})
    stop = threading.Event()
    threading.Thread(
        target=sse_reader, daemon=True,
        args=(f"{args.api}/v1/collections/bench/changes", args.token, sse, stop)).start()
    # The feeds and the stream start at the log's end: let the stream open before the writes.
    time.sleep(1)

    load = subprocess.run(
        [args.causeway, "bench", "--url", args.api, "--token", args.token, "--workload", "write",
         "--zipf", "0", "--keys", str(args.keys), "--no-load", "--rate", str(args.rate),
         "--duration", str(args.duration), "--collection", "bench", "--json"],
        check=True, capture_output=True, text=True, timeout=args.duration + 120)
    report = json.loads(load.stdout)
    written = report["ok"]

    deadline = time.time() + 60
    while time.time() < deadline and min(hook.count(), sse.count()) < written:
        time.sleep(0.2)
    stop.set()

    print(f"| sink | events | events/s | lag p50 ms | lag p99 ms | lag max ms |")
    print(f"|---|---:|---:|---:|---:|---:|")
    for a in (hook, sse):
        span = (a.last - a.first) if a.first and a.last and a.last > a.first else float("nan")
        ms = [l * 1000 for l in a.lags]
        print(f"| {a.name} | {a.count()} | {a.count() / span:,.0f} | {percentile(ms, 50):.1f} "
              f"| {percentile(ms, 99):.1f} | {max(ms, default=float('nan')):.1f} |")
    feeds = ["bench-hook"] + (["bench-kafka"] if args.kafka else [])
    deadline = time.time() + 60
    while args.kafka and time.time() < deadline and feed_histogram(args.cdc, "bench-kafka")[0] < written:
        time.sleep(0.2)
    print("\nThe cdc service's own measure, commit to the sink's acknowledgement (bucket bounds):\n")
    print("| feed | change events | lag p50 ms ≤ | lag p99 ms ≤ |")
    print("|---|---:|---:|---:|")
    for f in feeds:
        n, p50, p99 = feed_histogram(args.cdc, f)
        print(f"| {f} | {n} | {p50:g} | {p99:g} |")
    vis = report.get("visibility_lag") or {}
    print(f"\nwrites acknowledged: {written} at {report['writes_per_s']:,.0f}/s; visibility lag "
          f"(causeway bench) p50 {vis.get('p50_ms', 'n/a')} ms, p99 {vis.get('p99_ms', 'n/a')} ms")
    if hook.bad:
        print(f"webhook requests with a bad signature: {hook.bad}", file=sys.stderr)
        sys.exit(1)
    if min(hook.count(), sse.count()) < written:
        # A write equal to the document it replaces writes no version and has no event.
        print("fewer events than writes: equal rewrites, or events not delivered within 60 s",
              file=sys.stderr)


if __name__ == "__main__":
    main()
