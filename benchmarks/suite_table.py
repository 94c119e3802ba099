"""The paper's five settings over several tasks, from ``fidelity.py``'s JSON files: a markdown table with an
average row beside the paper's (OPT-1.3B, eight tasks), and a grouped bar plot.

    python benchmarks/suite_table.py --row 'siqa=plain@measurements/fidelity_siqa_budget30.json' \
        --row 'boolq=public-mix@measurements/fidelity_boolq.json' --plot suite.png

A row is ``LABEL=RECIPE@FILE[,FILE...]``: the recipe's three offsite settings come from the files, and the full
model's zero-shot and FedAvg fine-tuning from the first file that has them (``--no-ft`` runs have no FT).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

SETTINGS = ("full zero-shot", "emulator zero-shot", "emulator + adapter", "plug-in", "FedAvg full fine-tuning")
PAPER = {"full zero-shot": 0.425, "emulator + adapter": 0.466, "plug-in": 0.490, "FedAvg full fine-tuning": 0.499}


def read_row(spec: str) -> tuple[str, dict[str, tuple[float, float, int]], dict]:
    """``LABEL=RECIPE@FILE,...`` -> (label, setting -> (mean, standard error, seeds), the run's settings)."""
    label, _, rest = spec.partition("=")
    recipe, _, files = rest.partition("@")
    if not (label and recipe and files):
        raise SystemExit(f"--row {spec!r}: give LABEL=RECIPE@FILE[,FILE...]")
    found: dict[str, tuple[float, float, int]] = {}
    run_settings: dict = {}
    for path in files.split(","):
        data = json.loads(Path(path).read_text())
        run_settings = run_settings or data["settings"]
        for setting in SETTINGS:
            key = setting if setting in ("full zero-shot", "FedAvg full fine-tuning") else f"{recipe}: {setting}"
            if setting not in found and key in data["summary"]:
                entry = data["summary"][key]
                found[setting] = (entry["mean"], entry["se"], len(entry["values"]))
    missing = [s for s in SETTINGS if s not in found]
    if missing:
        raise SystemExit(f"--row {spec!r}: no {', '.join(missing)} in {files}")
    return label, found, run_settings


def cell(mean: float, se: float, seeds: int) -> str:
    spread = f" ± {se:.3f}" if not math.isnan(se) else ""
    return f"{mean:.3f}{spread}" + (f" ({seeds} seeds)" if seeds > 1 else "")


def table(rows: list[tuple[str, dict, dict]]) -> str:
    head = ["task (recipe)", "steps x rounds", *SETTINGS, "FT − plug-in"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, found, settings in rows:
        budget = f"{settings['local_steps']} x {settings['rounds']}"
        gap = found["FedAvg full fine-tuning"][0] - found["plug-in"][0]
        lines.append(f"| {label} | {budget} | " + " | ".join(cell(*found[s]) for s in SETTINGS) + f" | {gap:+.3f} |")
    means = {s: sum(found[s][0] for _, found, _ in rows) / len(rows) for s in SETTINGS}
    gap = means["FedAvg full fine-tuning"] - means["plug-in"]
    lines.append(f"| **average of the {len(rows)} rows** | | " + " | ".join(f"**{means[s]:.3f}**" for s in SETTINGS)
                 + f" | {gap:+.3f} |")
    paper_gap = PAPER["FedAvg full fine-tuning"] - PAPER["plug-in"]
    lines.append("| paper, OPT-1.3B, average of 8 tasks | | " + " | ".join(
        f"{PAPER[s]:.3f}" if s in PAPER else "-" for s in SETTINGS) + f" | {paper_gap:+.3f} |")
    return "\n".join(lines)


def plot(rows: list[tuple[str, dict, dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(rows), 3.8))
    width = 0.8 / len(SETTINGS)
    for i, setting in enumerate(SETTINGS):
        xs = [r + (i - (len(SETTINGS) - 1) / 2) * width for r in range(len(rows))]
        means = [found[setting][0] for _, found, _ in rows]
        errors = [0.0 if math.isnan(found[setting][1]) else found[setting][1] for _, found, _ in rows]
        ax.bar(xs, means, width, yerr=errors, label=setting, capsize=2)
    ax.set_xticks(range(len(rows)), [label for label, _, _ in rows], fontsize=8)
    ax.set_ylabel("accuracy, whole test split")
    ax.set_title("Offsite-tuning on smollm2-135m: the five settings per task", fontsize=10)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    ax.set_ylim(0, 1.1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--row", action="append", required=True, metavar="LABEL=RECIPE@FILE[,FILE...]")
    parser.add_argument("--plot", type=Path, help="write the grouped bar plot here (PNG)")
    args = parser.parse_args(argv)
    rows = [read_row(spec) for spec in args.row]
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
