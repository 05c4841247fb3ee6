"""Issues 19 and 20's headline figures across the sessions' GPU calls, against their targets: one
panel a figure, H200 and H100 processes marked apart (the shares transfer between the two, the
milliseconds do not). Reads docs/data/progress.csv (each row copied from its session's section of
docs/benchmarks.md), writes a PNG and prints the table it drew.

    python3 -m disagg.common.bench.progress --out docs/data/progress.png
"""

import argparse
import csv
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "docs" / "data" / "progress.csv"

# figure: (panel title, y label, target, whether lower is better)
FIGURES = {
    "qwen3_b1_share": ("Qwen3-30B-A3B decode, batch 1", "% of active-weight roofline", 65.0, False),
    "qwen3_prefill_share": (
        "Qwen3-30B-A3B prefill, 2048 tokens",
        "% of measured bf16 matmul rate",
        50.0,
        False,
    ),
    "v2lite_b1_multiple": ("DeepSeek-V2-Lite decode, batch 1", "× its active-weight roofline", 1.5, True),
}


def load(path: Path = DATA) -> dict[str, list[tuple[int, str, float]]]:
    """{figure: [(session, device, value), ...] in session order}."""
    series: dict[str, list[tuple[int, str, float]]] = {f: [] for f in FIGURES}
    with path.open() as f:
        for row in csv.DictReader(line for line in f if not line.startswith("#")):
            if row["figure"] not in FIGURES:
                raise ValueError(f"{path}: unknown figure {row['figure']!r}")
            series[row["figure"]].append((int(row["session"]), row["device"], float(row["value"])))
    return {f: sorted(points) for f, points in series.items()}


def table(series: dict) -> str:
    lines = [
        "| figure | target | first | latest | best on H200 | best on H100 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, points in series.items():
        title, _, target, lower = FIGURES[name]
        pick = min if lower else max
        values = {dev: [v for _, d, v in points if d == dev] for dev in ("H200", "H100")}
        best = {dev: f"{pick(vals):g}" if vals else "–" for dev, vals in values.items()}
        first, last = points[0], points[-1]
        lines.append(
            f"| {title} | {'≤' if lower else '≥'} {target:g} | {first[2]:g} (s{first[0]}, {first[1]}) "
            f"| {last[2]:g} (s{last[0]}, {last[1]}) | {best['H200']} | {best['H100']} |"
        )
    return "\n".join(lines)


def plot(series: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.8))
    for ax, (name, points) in zip(axes, series.items(), strict=True):
        title, ylabel, target, _ = FIGURES[name]
        ax.plot([s for s, _, _ in points], [v for _, _, v in points], color="0.7", zorder=1)
        for dev, marker in (("H200", "o"), ("H100", "s")):
            pts = [(s, v) for s, d, v in points if d == dev]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker=marker, label=dev, zorder=2)
        ax.axhline(target, color="tab:red", linestyle="--", label=f"target {target:g}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("session")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=Path("progress.png"))
    args = parser.parse_args()
    series = load(args.data)
    print(table(series))
    plot(series, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
