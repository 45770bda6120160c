#!/usr/bin/env python3
"""CPU time by process kind, from /proc: where the cores go during a benchmark run.

    bench/cpu.py sample SAMPLES.json &   # until SIGTERM: every process's user + system time
    ...the run...
    kill -TERM $!; wait $!
    bench/cpu.py report SAMPLES.json REPORT.json

`report` prints, for each kind of process (store nodes, api-server, Kafka broker JVM, config
manager, causeway dev, PostgreSQL, and the load generator: `causeway bench` or pgbench), the CPU
seconds it used while `sample` ran, its share of the machine, and the CPU microseconds per
operation (the `ok` of the run's JSON report). Processes are sampled every 0.2 s, so one that
ends meanwhile (a PostgreSQL backend, the load generator) is counted up to its last sample.
"""

import json
import os
import signal
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")
PERIOD_S = 0.2

# The start of a process's name (the kernel's comm, at most 15 characters) to its kind.
KINDS = [
    ("causeway-store-", "store nodes"),
    ("causeway-api-se", "api-server"),
    ("causeway-config", "config manager"),
    ("java", "Kafka broker (JVM)"),
    ("postgres", "PostgreSQL"),
    ("pgbench", "load generator"),
]


def kind_of(comm, cmdline):
    for prefix, kind in KINDS:
        if comm.startswith(prefix):
            return kind
    if comm == "causeway":
        args = cmdline.split("\0")[1:3]
        if "dev" in args:
            return "causeway dev"
        if "bench" in args:
            return "load generator"
    return None


def snapshot():
    """pid -> (kind, CPU ticks so far) of every process of a known kind."""
    processes = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline") as f:
                cmdline = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        # utime and stime are fields 14 and 15 of stat, 12 and 13 after the comm.
        ticks = int(fields[11]) + int(fields[12])
        kind = kind_of(comm, cmdline)
        if kind is not None:
            processes[pid] = [kind, ticks]
    return processes


def sample(path):
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    first = snapshot()
    last = dict(first)
    started = time.monotonic()
    while not stopped:
        time.sleep(PERIOD_S)
        last.update(snapshot())
    with open(path, "w") as f:
        json.dump({"first": first, "last": last, "seconds": time.monotonic() - started}, f)


def report(path, report_path):
    with open(path) as f:
        samples = json.load(f)
    with open(report_path) as f:
        ops = json.load(f).get("ok", 0)
    used = {}
    for pid, (kind, ticks) in samples["last"].items():
        was = samples["first"].get(pid, [kind, 0])[1]
        used[kind] = used.get(kind, 0) + (ticks - was) / TICKS
    seconds, cores = samples["seconds"], os.cpu_count()
    total = sum(used.values())
    print("%d operations acknowledged in %.1f s\n" % (ops, seconds))
    print("| process | CPU s | share of the machine | CPU µs per op |")
    print("|---|---:|---:|---:|")
    for kind, cpu in sorted(used.items(), key=lambda kv: -kv[1]) + [("all", total)]:
        per_op = "%.0f" % (cpu * 1e6 / ops) if ops else "-"
        print("| %s | %.2f | %.0f %% | %s |" % (kind, cpu, 100 * cpu / (seconds * cores), per_op))


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "sample":
        sample(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "report":
        report(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
