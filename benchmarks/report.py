"""docs/benchmarks.md and its chart, from the sections of one run."""

from __future__ import annotations

from pathlib import Path

from .common import Check, Section

HEADER = """# Benchmarks

Written by `make bench` (`python -m benchmarks`); do not edit by hand, run it
again. Every number below comes from the run of {date}, on this machine:

| | |
|---|---|
{machine}

Each comparison runs our code and its peer in the same run, on the same
bytes. Other work on the machine (see the load averages above) shifts both
sides; the timed benchmarks alternate the sides and report medians, so read
the ratios rather than the absolute numbers.
"""


def _table(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * width]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines) + "\n"


def _check_rows(checks: list[Check]) -> list[list[str]]:
    rows = [["target", "ours", "peer / bound", "ratio", "target", "met", "note"]]
    for c in checks:
        rows.append(
            [
                c.name.replace("|", "\\|"),
                c.ours,
                c.peer,
                f"{c.ratio:.3g}",
                c.target,
                "**yes**" if c.met else "**no**",
                c.note,
            ]
        )
    return rows


def write(
    out_dir: Path,
    sections: list[Section],
    machine: dict[str, str],
    peers: dict[str, str],
    defaults: str,
    chart_name: str = "benchmarks.png",
) -> Path:
    """Write benchmarks.md (and the chart, if matplotlib is there); return the markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    checks = [c for s in sections for c in s.checks]
    met = sum(c.met for c in checks)
    machine_rows = [f"| {k} | {v} |" for k, v in machine.items() if k != "date"]
    machine_rows += [f"| {k} | {v} |" for k, v in peers.items()]
    parts = [HEADER.format(date=machine["date"], machine="\n".join(machine_rows))]
    parts.append(f"\n## Targets: {met} of {len(checks)} met\n\n")
    parts.append(_table(_check_rows(checks)))
    chart = _chart(out_dir / chart_name, checks, sections)
    if chart:
        parts.append(f"\n![ratio to target, and the engine sweep]({chart_name})\n")
    for section in sections:
        parts.append(f"\n## {section.title}\n\n{section.text}\n\n")
        parts.append(_table(section.rows))
    parts.append(f"\n## Defaults\n\n{defaults}\n")
    path = out_dir / "benchmarks.md"
    path.write_text("".join(parts))
    return path


def _chart(path: Path, checks: list[Check], sections: list[Section]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sweep = [point for s in sections for point in s.chart.get("sweep", [])]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 0.45 * len(checks) + 2.5))
    scores = []
    for c in checks:
        if c.op == ">=":
            scores.append(c.ratio / c.bound)
        else:
            scores.append(c.bound / c.ratio if c.ratio else float("inf"))
    labels = [c.name for c in checks]
    colors = ["tab:green" if c.met else "tab:red" for c in checks]
    left.barh(range(len(checks)), [min(s, 5) for s in scores], color=colors)
    left.set_yticks(range(len(checks)), labels, fontsize=8)
    left.invert_yaxis()
    left.axvline(1.0, color="black", linewidth=1)
    left.set_xlabel("how far past its target (1 = exactly on it; capped at 5)")
    left.set_title("Targets")
    if sweep:
        for label, speed, ratio in sweep:
            right.scatter(speed, ratio, color="tab:blue")
            right.annotate(
                label, (speed, ratio), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
        right.axhline(1.15, color="tab:red", linewidth=1, linestyle="--")
        right.set_xlabel("input MB/s (all cores)")
        right.set_ylabel("gzip size / gzip -6 size")
        right.set_title("Deflate engine and level (sample input)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
