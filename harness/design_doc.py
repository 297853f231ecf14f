"""Keep the generated parts of docs/design.md true: the tables and metrics sections are
rendered from the registry (``ddpm_engine.metrics``) and ``harness.store.tables``.

    python -m harness.design_doc          # rewrite the generated sections in place
    python -m harness.design_doc --check  # exit 1 if the document is out of date (CI runs it as a test)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ddpm_engine.metrics import PER_RUN, TABLES

from .store.tables import table_columns

DOC = Path(__file__).resolve().parent.parent / "docs" / "design.md"
BETTER = {"lower": "lower", "higher": "higher", "zero": "closer to 0", None: "–"}


def tables_section() -> str:
    lines = ["| table | one row per | columns |", "|---|---|---|"]
    per = {
        "runs": "run key",
        "dataset": "run (its training split)",
        "train": "logged step",
        "per_t": "probe x t",
        "probe": "probe",
        "drift": "reverse step",
        "drift_hist": "reverse step x bin",
        "quality": "run (its summary: the per-run metrics)",
    }
    for table, columns in table_columns().items():
        lines.append(f"| `{table}` | {per.get(table, '')} | {', '.join(f'`{c}`' for c in columns)} |")
    return "\n".join(lines)


def metrics_section() -> str:
    lines = ["| metric | unit | better | definition | computed by |", "|---|---|---|---|---|"]
    for m in PER_RUN.values():
        better = BETTER[m.better] + (" (cost: never starred)" if m.cost else "")
        lines.append(f"| `{m.name}` | {m.unit or '–'} | {better} | {m.definition} | `{m.source or '–'}` |")
    exact = ", ".join(f"`{m.name}`" for m in PER_RUN.values() if m.exact)
    logged = ", ".join(f"`{m.name}`" for m in PER_RUN.values() if m.scale == "log")
    lines += [
        "",
        f"Exact given the config (the same in every seed; hypotheses judge them by their value): {exact}.",
        "",
        f"Log scale (positive and skewed; hypotheses and effects judge log values, ratios to the baseline): {logged}.",
        "",
        "Per-t and per-step columns (tables other than `quality`):",
        "",
        "| table | column | unit | definition |",
        "|---|---|---|---|",
    ]
    for table, metrics in TABLES.items():
        if table == "quality":
            continue
        for m in metrics.values():
            lines.append(f"| `{table}` | `{m.name}` | {m.unit or '–'} | {m.definition} |")
    return "\n".join(lines)


SECTIONS = {"tables": tables_section, "metrics": metrics_section}


def render(text: str) -> str:
    for name, build in SECTIONS.items():
        pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- /generated:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"{DOC} has no <!-- generated:{name} --> ... <!-- /generated:{name} --> block")
        body = build()
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main(argv: list[str]) -> int:
    text = DOC.read_text(encoding="utf-8")
    fresh = render(text)
    if "--check" in argv:
        if fresh != text:
            print(f"{DOC} is out of date: run `python -m harness.design_doc`", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
