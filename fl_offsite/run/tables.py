"""Readable tables of a run's records."""
from __future__ import annotations

from fl_offsite.run.records import ClientReport, RoundRecord


def mean(clients: list[ClientReport], metric: str) -> float | None:
    """The mean of a client ``metric`` (a :class:`ClientReport` attribute) over the clients that sent it."""
    values = [value for c in clients if (value := getattr(c, metric)) is not None]
    return sum(values) / len(values) if values else None


def round_table(rounds: list[RoundRecord]) -> str:
    """One line per round: accuracy of every evaluated model, train loss, bytes, time, memory."""
    models = list(rounds[0].scores) if rounds else []
    head = ["round", *(f"{m} acc" for m in models), "train loss", "MB down/client", "MB up/client",
            "MB so far (all)", "round s", "client peak MB"]
    return markdown_table(head, [_row(record, models) for record in rounds])


def _row(record: RoundRecord, models: list[str]) -> list[str]:
    clients = record.clients or []
    peaks = [c.peak_memory_mb for c in clients if c.peak_memory_mb is not None]
    return [
        str(record.round),
        *(_format(record.scores.get(m, {}).get("acc"), ".3f") for m in models),  # eval.every skips some
        _format(mean(clients, "train_loss"), ".4f"),
        _format(mean(clients, "bytes_down"), ".1f", 1e6),
        _format(mean(clients, "bytes_up"), ".1f", 1e6),
        _format(record.traffic.bytes_so_far() if record.traffic else None, ".1f", 1e6),
        _format(record.seconds, ".0f"),
        _format(max(peaks, default=None), ".0f"),
    ]


def _format(value: float | None, spec: str, unit: float = 1.0) -> str:
    return "-" if value is None else format(value / unit, spec)


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
