"""Readable tables of a run's records."""
from __future__ import annotations


def bytes_so_far(traffic: dict) -> int:
    """Everything the rounds sent up to a round's ``communication`` record, all clients: adapters down and
    up, and re-alignment factors down (the one-time model deliveries apart)."""
    return sum(traffic.get(f"cumulative_{k}", 0) for k in ("bytes_down", "bytes_up", "realign_bytes_down"))


def round_table(rounds: list[dict]) -> str:
    """One line per round: accuracy of every evaluated model, train loss, bytes, time, memory."""
    models = list(rounds[0]["eval"]) if rounds else []
    head = ["round", *(f"{m} acc" for m in models), "train loss", "MB down/client", "MB up/client",
            "MB so far (all)", "round s", "client peak MB"]
    rows = []
    for record in rounds:
        clients = record.get("clients", [])

        def mean(key: str, clients: list[dict] = clients) -> float:
            return sum(c[key] for c in clients) / len(clients) if clients else float("nan")
        rows.append([
            str(record["round"]),
            *(f"{record['eval'][m]['acc']:.3f}" if record["eval"] else "-" for m in models),  # eval.every skips some
            f"{mean('train-loss'):.4f}" if clients else "-",
            f"{mean('bytes_down') / 1e6:.1f}" if clients else "-",
            f"{mean('bytes_up') / 1e6:.1f}" if clients else "-",
            f"{bytes_so_far(traffic) / 1e6:.1f}"
            if (traffic := record.get("communication")) else "-",
            f"{record['seconds']:.0f}" if "seconds" in record else "-",
            f"{max(c['peak-memory-mb'] for c in clients):.0f}" if clients else "-",
        ])
    return markdown_table(head, rows)


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(head, *rows, strict=False)]
    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def describe_composition(composition: dict) -> str:
    """One line: each source's documents and megabytes, what was left out and why."""
    parts = [f"{n} {s['documents']} docs / {s['characters'] / 1e6:.1f} MB" for n, s in composition["sources"].items()]
    text = ", ".join(parts)
    if composition["left_out"]:
        text += "; left out: " + ", ".join(f"{n} ({why})" for n, why in composition["left_out"].items())
    if composition["dropped_as_task_text"]:
        text += f"; {composition['dropped_as_task_text']} documents dropped for sharing 13 words with the task"
    return text
