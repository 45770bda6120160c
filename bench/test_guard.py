"""Tests of bench/guard.py (run by scripts/test.sh)."""
import json
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(__file__))
import guard  # noqa: E402

MARKDOWN = """# Benchmarks

## End to end

| ratio | value |
|---|---:|
| not_guarded | 9.99 |

### Regression guard

| guarded ratio | value |
|---|---:|
| `dev_write_vs_postgres` | 2.00 |
| kafka_write_vs_postgres | 1.00 |

## Transitions

| something_else | 5.00 |
"""


class GuardTest(unittest.TestCase):
    def test_reads_only_the_guard_section(self):
        self.assertEqual(guard.recorded(MARKDOWN),
                         {"dev_write_vs_postgres": 2.0, "kafka_write_vs_postgres": 1.0})

    def test_a_fall_past_twenty_percent_warns_and_a_smaller_one_does_not(self):
        base = guard.recorded(MARKDOWN)
        lines, fell = guard.compare(base, {"dev_write_vs_postgres": 1.7, "kafka_write_vs_postgres": 1.3})
        self.assertFalse(fell, lines)
        lines, fell = guard.compare(base, {"dev_write_vs_postgres": 1.5, "kafka_write_vs_postgres": 1.0})
        self.assertTrue(fell)
        self.assertTrue(any(line.startswith("WARN dev_write_vs_postgres") for line in lines), lines)

    def test_a_missing_ratio_counts_as_fallen(self):
        _, fell = guard.compare(guard.recorded(MARKDOWN), {"dev_write_vs_postgres": 2.0})
        self.assertTrue(fell)

    def test_exit_status(self):
        with tempfile.TemporaryDirectory() as d:
            md, res = os.path.join(d, "B.md"), os.path.join(d, "r.json")
            def write(path, text):
                with open(path, "w") as f:
                    f.write(text)

            write(md, MARKDOWN)
            write(res, json.dumps({"ratios": {"dev_write_vs_postgres": 2.1, "kafka_write_vs_postgres": 0.95}}))
            self.assertEqual(guard.main(["guard", res, md]), 0)
            write(res, json.dumps({"ratios": {"dev_write_vs_postgres": 0.5, "kafka_write_vs_postgres": 0.95}}))
            self.assertEqual(guard.main(["guard", res, md]), 1)
            write(md, "# nothing here\n")
            self.assertEqual(guard.main(["guard", res, md]), 2)

    def test_the_recorded_table_in_benchmarks_md_parses(self):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(root, "BENCHMARKS.md")) as f:
            table = guard.recorded(f.read())
        self.assertIn("kafka_write_vs_postgres", table)


if __name__ == "__main__":
    unittest.main()
