"""The regression guard: compares the ratios of a bench/run.sh run (bench/results.json) with the
ones recorded in BENCHMARKS.md, and warns about every ratio that fell by more than 20 %.

    python3 bench/guard.py [bench/results.json] [BENCHMARKS.md]

BENCHMARKS.md holds the recorded ratios in the table under the heading "Regression guard":
rows `| <ratio name> | <value> |`, the names those of `ratios` in results.json. Ratios, not
absolute rates, because they compare Causeway with PostgreSQL and the raw log in the same run
on the same machine, so the load of the machine cancels out. Exit status: 0 when no ratio fell,
1 when one did, 2 when the files cannot be compared.
"""
import json
import re
import sys

TOLERANCE = 0.20


def recorded(markdown):
    """The guard table's {name: value}."""
    section = re.split(r"^#+ Regression guard\s*$", markdown, flags=re.M)
    if len(section) < 2:
        raise ValueError("BENCHMARKS.md has no 'Regression guard' section")
    table = {}
    for line in section[1].splitlines():
        if line.startswith("#"):
            break
        m = re.match(r"^\|\s*`?([a-z0-9_]+)`?\s*\|\s*([0-9.]+)\s*\|", line)
        if m:
            table[m.group(1)] = float(m.group(2))
    if not table:
        raise ValueError("the 'Regression guard' section has no `| name | value |` rows")
    return table


def compare(baseline, current):
    """(lines to print, whether a ratio fell past the tolerance)."""
    lines, fell = [], False
    for name, before in sorted(baseline.items()):
        now = current.get(name)
        if now is None:
            lines.append("MISSING %s: recorded %.2f, not in this run" % (name, before))
            fell = True
            continue
        change = (now - before) / before if before else 0.0
        status = "ok"
        if change < -TOLERANCE:
            status, fell = "WARN", True
        lines.append("%-4s %s: %.2f recorded, %.2f now (%+.0f %%)" % (status, name, before, now, 100 * change))
    return lines, fell


def main(argv):
    results = argv[1] if len(argv) > 1 else "bench/results.json"
    benchmarks = argv[2] if len(argv) > 2 else "BENCHMARKS.md"
    try:
        with open(results) as f:
            current = json.load(f)["ratios"]
        with open(benchmarks) as f:
            baseline = recorded(f.read())
    except (OSError, KeyError, ValueError) as e:
        print("guard: cannot compare: %s" % e, file=sys.stderr)
        return 2
    lines, fell = compare(baseline, current)
    print("\n".join(lines))
    if fell:
        print("guard: a ratio fell by more than %d %% (or is missing)" % (100 * TOLERANCE))
    return 1 if fell else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
