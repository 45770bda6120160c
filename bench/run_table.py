"""The table of bench/run.sh: reads the JSON reports of one run from its work dir, writes the
Markdown table (with the ratios and the sustained-rate searches) and a JSON summary that
bench/guard.py compares with BENCHMARKS.md.

    python3 bench/run_table.py WORK OUT OUT_JSON  (the run's settings come from the environment)
"""
import json
import os
import platform
import subprocess
import sys

work, out, out_json = sys.argv[1:4]
env = os.environ.get
duration, conc, doc, keys = env("DURATION"), env("CONCURRENCY"), env("DOC_BYTES"), env("KEYS")
p, r, dp, dr = env("PARTITIONS"), env("REPLICAS"), env("DEV_PARTITIONS"), env("DEV_REPLICAS")
profile, kn = env("PROFILE"), env("KAFKA_NODES", "1")
kafka = "Kafka 4.4, %s broker%s%s" % (kn, "" if kn == "1" else "s", ", RF 3" if int(kn) >= 3 else "")


def load(name):
    return json.load(open(os.path.join(work, name + ".json")))


def fmt(x):
    return "-" if x is None else ("%.2f" % x)


def sustained(j):
    """(the best held step's ops/s or 0, its cell text)."""
    s = j.get("sustained")
    if not s:
        return None, "-"
    held = [st for st in s["steps"] if st["held"]]
    if not held:
        return 0.0, "none held (lowest tried %.0f/s)" % min(st["rate"] for st in s["steps"])
    b = max(held, key=lambda st: st["rate"])
    return b["ops_per_s"], "%.0f (p99 %s, lag p99 %s)" % (b["ops_per_s"], fmt(b["p99_ms"]), fmt(b["lag_p99_ms"]))


rows = [
    ("causeway dev (embedded log, %sx%s, one process), PUT" % (dp, dr), "dev-write"),
    ("Causeway LocalCluster on %s, %sx%s, PUT" % (kafka, p, r), "kafka-write"),
    ("raw embedded log append (same payload)", "raw-embedded"),
    ("raw append to %s (same payload)" % kafka, "raw-kafka"),
    ("PostgreSQL 15 jsonb upsert, synchronous_commit=on (pgbench)", "postgres"),
]
res = {name: load(name) for _, name in rows}
# pgbench's report names its rate ops_per_s (bench/lib.sh, pg_bench): upserts are writes.
res["postgres"]["writes_per_s"] = res["postgres"]["ops_per_s"]
lines = [
    "| setup | writes/s | p50 ms | p99 ms | p999 ms | errors | 429 | visibility lag p50 / p99 ms | sustained writes/s |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
]
for label, name in rows:
    j = res[name]
    lat = j.get("latency") or {}
    lag = j.get("visibility_lag")
    lag_s = "%s / %s" % (fmt(lag["p50_ms"]), fmt(lag["p99_ms"])) if lag else "-"
    lines.append("| %s | %.0f | %s | %s | %s | %d | %d | %s | %s |" % (
        label, j["writes_per_s"], fmt(lat.get("p50_ms")), fmt(lat.get("p99_ms")),
        fmt(lat.get("p999_ms")), j["errors"], j.get("throttled", 0), lag_s, sustained(j)[1]))


def ratio(a, b):
    return res[a]["writes_per_s"] / res[b]["writes_per_s"] if res[b]["writes_per_s"] else float("nan")


pg = res["postgres"]["writes_per_s"]
ratios = {
    "dev_write_vs_postgres": ratio("dev-write", "postgres"),
    "dev_sustained_vs_postgres": (sustained(res["dev-write"])[0] or 0.0) / pg,
    "kafka_write_vs_postgres": ratio("kafka-write", "postgres"),
    "kafka_sustained_vs_postgres": (sustained(res["kafka-write"])[0] or 0.0) / pg,
    "dev_write_vs_raw_embedded": ratio("dev-write", "raw-embedded"),
    "kafka_write_vs_raw_kafka": ratio("kafka-write", "raw-kafka"),
}
labels = {
    "dev_write_vs_postgres": "causeway dev writes/s ÷ PostgreSQL upserts/s",
    "dev_sustained_vs_postgres": "causeway dev sustained writes/s ÷ PostgreSQL upserts/s",
    "kafka_write_vs_postgres": "Causeway on Kafka writes/s ÷ PostgreSQL upserts/s",
    "kafka_sustained_vs_postgres": "Causeway on Kafka sustained writes/s ÷ PostgreSQL upserts/s",
    "dev_write_vs_raw_embedded": "causeway dev writes/s ÷ raw embedded log appends/s",
    "kafka_write_vs_raw_kafka": "Causeway on Kafka writes/s ÷ raw Kafka appends/s",
}
lines += ["", "| ratio | value |", "|---|---:|"]
for key, value in ratios.items():
    lines.append("| %s (`%s`) | %.2f |" % (labels[key], key, value))
lines.append("")
j = load("kafka-steady")
lat, lag = j.get("latency") or {}, j.get("visibility_lag") or {}
lines.append("Steady write load on Kafka (open loop, %s writes/s offered): %.0f writes/s, p50 %s ms, p99 %s ms, "
             "visibility lag p50 %s ms, p99 %s ms, %d errors." % (
                 env("STEADY_RATE", "500"), j["writes_per_s"], fmt(lat.get("p50_ms")), fmt(lat.get("p99_ms")),
                 fmt(lag.get("p50_ms")), fmt(lag.get("p99_ms")), j["errors"]))
j = load("kafka-read")
lat = j.get("latency") or {}
lines.append("Reads (GET, uniform) on Kafka: %.0f reads/s, p50 %s ms, p99 %s ms, p999 %s ms, %d errors." % (
    j["reads_per_s"], fmt(lat.get("p50_ms")), fmt(lat.get("p99_ms")), fmt(lat.get("p999_ms")), j["errors"]))
for name, label in (("dev-ycsb-b", "causeway dev"), ("kafka-ycsb-b", "Causeway on Kafka")):
    j = load(name)
    lat = j.get("latency") or {}
    lines.append("YCSB-B (95%% read, zipf 0.99) on %s: %.0f ops/s (%.0f reads/s), p50 %s ms, p99 %s ms, %d errors." % (
        label, j["throughput_ops_s"], j["reads_per_s"], fmt(lat.get("p50_ms")), fmt(lat.get("p99_ms")), j["errors"]))
for name in ("dev-write", "kafka-write"):
    s = res[name].get("sustained")
    if not s:
        continue
    lines += ["", "Sustained-rate search, %s (write p99 <= %g ms, visibility lag p99 <= %g ms):" % (
        name, s["max_p99_ms"], s["max_lag_p99_ms"])]
    for st in s["steps"]:
        lines.append("- %.0f/s offered: %.0f ops/s, p99 %s ms, lag p50 %s / p99 %s ms (%d probes), "
                     "%d errors, %d throttled: %s" % (
                         st["rate"], st["ops_per_s"], fmt(st["p99_ms"]), fmt(st["lag_p50_ms"]),
                         fmt(st["lag_p99_ms"]), st["lag_samples"], st["errors"], st["throttled"],
                         "held" if st["held"] else "not held"))
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
                     capture_output=True, text=True).stdout.strip()
lines += ["", "Closed loop, %s clients, %s s per run, %s-byte JSON documents, %s keys (uniform for the write "
          "rows). Build profile: %s. Machine: %s cores (%s), %s." % (
              conc, duration, doc, keys, profile, os.cpu_count(), cpu, platform.platform())]
text = "\n".join(lines) + "\n"
open(out, "w").write(text)
with open(out_json, "w") as f:
    json.dump({"ratios": ratios, "runs": res}, f, indent=1)
print(text)
