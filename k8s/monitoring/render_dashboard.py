"""Render the Grafana dashboard with real data to a PNG (docs/dashboard.png), without Grafana.

    python k8s/monitoring/render_dashboard.py [--out docs/dashboard.png] [--duration 120]
    python k8s/monitoring/render_dashboard.py --targets router=http://h:8000,prefill=http://h:30000,decode=http://h:30001

By default it starts the SLURM script's prefill + decode + router on this machine
(k8s/slurm/local_cluster.py), sends a varying chat load through the router, and meanwhile a real
Prometheus (Debian package `prometheus`) scrapes the three /metrics every second. Each panel's
queries from disagg-dashboard.json then run through Prometheus' own PromQL engine (query_range,
with $namespace = .* and $__rate_interval = 15s) and matplotlib draws the panels on the dashboard's
24-column grid. Only Grafana's drawing is replaced; the queries and the data are the real ones.
Needs: pip install matplotlib (the `docs` extra).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from disagg.common.net import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DASHBOARD = HERE / "grafana" / "disagg-dashboard.json"
RATE_INTERVAL = "15s"
SCRAPE_INTERVAL = "1s"
PROMPTS = [
    "Explain why the sky is blue.",
    "Write a haiku about GPUs.",
    "List three uses of a hash map.",
    "What is prefill/decode disaggregation?",
    "Summarize the plot of Hamlet in two sentences.",
]
SYSTEM = "You are a concise assistant for an LLM serving team. " * 4  # shared prefix: cache hits


# ---- Prometheus ------------------------------------------------------------------------------------


def start_prometheus(targets: dict[str, str], workdir: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("prometheus")
    if binary is None:
        sys.exit("prometheus not found: apt-get install prometheus (Debian) or put it on PATH")
    static = [
        {"targets": [url.split("://", 1)[1]], "labels": {"pod": f"{name}-0", "component": name}}
        for name, url in targets.items()
    ]
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [{"job_name": "disagg", "metrics_path": "/metrics", "static_configs": static}],
    }
    (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=open(workdir / "prometheus.log", "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(60):
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"prometheus did not start, see {workdir / 'prometheus.log'}")


def query_range(prom: str, expr: str, start: float, end: float, step: float = 2.0) -> list[dict]:
    expr = expr.replace("$namespace", ".*").replace("$__rate_interval", RATE_INTERVAL)
    r = httpx.get(
        f"{prom}/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step}
    )
    r.raise_for_status()
    return r.json()["data"]["result"]


# ---- load ------------------------------------------------------------------------------------------


def run_load(router: str, duration: float, stop: threading.Event) -> dict[str, int]:
    """A load that changes over time: 1 client, then 4, then 2 (so rates and queues move)."""
    counts = {"ok": 0, "error": 0}
    phases = [(0.3, 1), (0.45, 4), (0.25, 2)]  # (share of duration, concurrency)

    def client(until: float, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < until and not stop.is_set():
                body = {
                    "messages": [{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": rng.choice(PROMPTS)}],
                    "max_tokens": rng.randint(8, 48), "temperature": 0.7,
                }  # fmt: skip
                try:
                    ok = http.post(f"{router}/v1/chat/completions", json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                counts["ok" if ok else "error"] += 1

    for i, (share, concurrency) in enumerate(phases):
        until = time.monotonic() + share * duration
        threads = [threading.Thread(target=client, args=(until, 10 * i + j)) for j in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return counts


# ---- drawing ---------------------------------------------------------------------------------------

BG, PANEL, GRID, TEXT = "#111217", "#181b1f", "#2c3235", "#ccccdc"
COLORS = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff", "#ffb357", "#96d98d"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    import re

    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()
    return re.sub(r"\s+", " ", text) or "value"


def format_axis(ax, unit: str) -> None:
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    if unit == "percentunit":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    elif unit == "s":
        ax.yaxis.set_major_formatter(
            FuncFormatter(lambda v, _: f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2g} s")
        )
    elif unit == "reqps":
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g} req/s"))


def draw(
    dashboard: dict, data: dict[int, list[tuple[str, list]]], span: tuple[float, float], out: Path, note: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    unit_w, unit_h = 0.95, 0.33  # inches per grid cell
    fig = plt.figure(figsize=(24 * unit_w, rows * unit_h + 0.8), facecolor=BG)
    height = rows * unit_h + 0.8
    fig.text(0.01, 1 - 0.35 / height, dashboard["title"], color=TEXT, fontsize=16, weight="bold", va="center")
    fig.text(0.99, 1 - 0.35 / height, note, color="#8e8e8e", fontsize=9, ha="right", va="center")
    top = 1 - 0.8 / height

    def rect(g):  # grid cell -> figure fraction, with a small gutter
        x0, w = g["x"] / 24, g["w"] / 24
        y0 = top - (g["y"] + g["h"]) * unit_h / height
        return [x0 + 0.004, y0 + 0.004, w - 0.008, g["h"] * unit_h / height - 0.008]

    for p in dashboard["panels"]:
        g = p["gridPos"]
        if p["type"] == "row":
            r = rect(g)
            fig.text(r[0], r[1] + r[3] / 2, p["title"], color=TEXT, fontsize=12, weight="bold", va="center")
            continue
        r = rect(g)
        ax = fig.add_axes([r[0] + 0.028, r[1] + 0.035, r[2] - 0.034, r[3] - 0.07], facecolor=PANEL)
        fig.patches.append(
            plt.Rectangle((r[0], r[1]), r[2], r[3], transform=fig.transFigure, color=PANEL, zorder=-1)
        )
        fig.text(
            r[0] + 0.006, r[1] + r[3] - 0.012, p["title"], color=TEXT, fontsize=9, weight="bold", va="top"
        )
        series = data.get(p["id"], [])
        for i, (name, points) in enumerate(series[:8]):
            xs = [t - span[0] for t, _ in points]
            ax.plot(xs, [v for _, v in points], color=COLORS[i % len(COLORS)], lw=1.4, label=name[:48])
        if not series:
            ax.text(0.5, 0.5, "No data", color="#8e8e8e", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(
                loc="upper left",
                fontsize=6.5,
                frameon=False,
                labelcolor=TEXT,
                ncol=2 if len(series) > 4 else 1,
            )
        format_axis(ax, p["fieldConfig"]["defaults"].get("unit", ""))
        ax.tick_params(colors="#8e8e8e", labelsize=7)
        ax.grid(color=GRID, lw=0.6)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_xlim(0, span[1] - span[0])
        ax.set_xlabel("seconds", color="#8e8e8e", fontsize=7, labelpad=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, facecolor=BG)


# ---- main ------------------------------------------------------------------------------------------


def collect(dashboard: dict, prom: str, start: float, end: float) -> dict[int, list[tuple[str, list]]]:
    data: dict[int, list[tuple[str, list]]] = {}
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            for result in query_range(prom, t["expr"], start, end):
                points = [
                    (float(ts), float(v)) for ts, v in result["values"] if v not in ("NaN", "+Inf", "-Inf")
                ]
                if points:
                    data.setdefault(p["id"], []).append((legend(t["legendFormat"], result["metric"]), points))
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    ap.add_argument(
        "--targets", help="router=URL,prefill=URL,decode=URL of a running cluster (default: start one)"
    )
    args = ap.parse_args()
    dashboard = json.loads(DASHBOARD.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        workdir, cluster, prom_proc = Path(tmp), None, None
        try:
            if args.targets:
                targets = dict(item.split("=", 1) for item in args.targets.split(","))
            else:
                sys.path.insert(0, str(REPO / "k8s" / "slurm"))
                from local_cluster import LocalPDCluster

                (workdir / "cluster").mkdir()
                cluster = LocalPDCluster(workdir / "cluster").start()
                targets = {name: cluster.url(name) for name in ("router", "prefill", "decode")}
            prom_proc, prom = start_prometheus(targets, workdir)
            start = time.time()
            counts = run_load(targets["router"], args.duration, threading.Event())
            time.sleep(5)
            span = (start, time.time())
            data = collect(dashboard, prom, *span)
        finally:
            if prom_proc is not None:
                prom_proc.terminate()
                prom_proc.wait()
            if cluster is not None:
                cluster.stop()
    note = (
        f"local run on CPU (default model): {counts['ok']} ok / {counts['error']} failed requests over "
        f"{span[1] - span[0]:.0f}s through the router; scraped: {', '.join(targets)}; "
        "PromQL by Prometheus, drawn by matplotlib"
    )
    draw(dashboard, data, span, args.out, note)
    empty = [p["title"] for p in dashboard["panels"] if p["type"] != "row" and p["id"] not in data]
    print(f"wrote {args.out}; {counts}; panels without data: {empty}")


if __name__ == "__main__":
    main()
