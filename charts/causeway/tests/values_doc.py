"""The chart README's table of values, made from values.schema.json and values.yaml.

    python3 charts/causeway/tests/values_doc.py           prints the table
    python3 charts/causeway/tests/values_doc.py --write   rewrites it in README.md

test_chart.py checks that README.md holds exactly this table.
"""

import json
import pathlib
import sys

CHART = pathlib.Path(__file__).resolve().parent.parent
BEGIN = "<!-- values: begin (made by tests/values_doc.py --write) -->"
END = "<!-- values: end -->"


def load_values():
    """values.yaml, read with PyYAML when present (the tools' venv has it)."""
    import yaml

    return yaml.safe_load((CHART / "values.yaml").read_text())


def rows(schema, values, prefix=""):
    """(path, type, default, description) of every leaf value and free-form object."""
    for name, prop in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        default = values.get(name) if isinstance(values, dict) else None
        if prop.get("type") == "object" and "properties" in prop:
            yield from rows(prop, default or {}, path + ".")
            continue
        kind = prop.get("type") or " or ".join(
            sorted({alt.get("type", "?") for alt in prop.get("anyOf", [])})
        )
        if "enum" in prop:
            kind += " (" + ", ".join(map(str, prop["enum"])) + ")"
        yield path, kind, json.dumps(default, ensure_ascii=False), prop.get("description", "")


def table():
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = ["| value | type | default | description |", "|---|---|---|---|"]
    for path, kind, default, description in rows(schema, load_values()):
        cell = default.replace("|", "\\|")
        lines.append(f"| `{path}` | {kind} | `{cell}` | {description} |")
    return "\n".join(lines) + "\n"


def readme_with_table(readme):
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}{END}{tail}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        path = CHART / "README.md"
        path.write_text(readme_with_table(path.read_text()))
    else:
        sys.stdout.write(table())
