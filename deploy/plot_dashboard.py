"""Render the Grafana dashboard's panels (deploy/grafana/tidelog.json) from a live Prometheus
with matplotlib: the same expressions and legends, one subplot per panel, into a PNG.

    python deploy/plot_dashboard.py --prometheus http://127.0.0.1:9090 --minutes 30 \\
        --out docs/img/dashboard.png

``--failover`` instead starts everything itself on this machine (the compose file's three node
services as local processes and a real Prometheus, as tests/integration/test_prometheus.py
does), runs a bounded produce/consume load, kills node 3 and restarts it, then renders that
window: what docs/operations.md shows. Needs Debian's ``prometheus`` binary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "tidelog.json"

#: Seconds of load before the plotted window (the dashboard's rate windows are 1 minute).
WARMUP_S = 65.0

QueryRange = Callable[[str, float, float, float], Any]


def legend(template: str, labels: dict[str, str]) -> str:
    out = template
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def plot(
    query_range: QueryRange,
    start: float,
    end: float,
    out: Path,
    marks: dict[str, float],
    names: dict[str, str] | None = None,
) -> None:
    """One subplot per panel over [start, end]; ``marks`` are red lines (events), ``names``
    rename ``instance`` values in the legends (an address to "node 3")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = json.loads(DASHBOARD.read_text())["panels"]
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(14, 2.6 * rows), sharex=True)
    step = max(1.0, (end - start) / 300)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for target in panel["targets"]:
            for series in query_range(target["expr"], start, end, step):
                xs: list[float] = []
                ys: list[float] = []
                for t, v in series["values"]:
                    if xs and float(t) - start - xs[-1] > 2.5 * step:
                        xs.append(xs[-1] + step)  # a gap (the series was absent): no line
                        ys.append(math.nan)
                    xs.append(float(t) - start)
                    ys.append(float(v))
                labels = dict(series["metric"])
                if names and labels.get("instance") in names:
                    labels["instance"] = names[labels["instance"]]
                ax.plot(xs, ys, label=legend(target.get("legendFormat", ""), labels))
        for name, at in marks.items():
            ax.axvline(at - start, color="red", linestyle="--", linewidth=0.8)
            ax.text(at - start, 1.0, f" {name}", transform=ax.get_xaxis_transform(), fontsize=7,
                    color="red", va="top")  # fmt: skip
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        ax.set_title(f"{panel['title']} [{unit}]", fontsize=9)
        ax.tick_params(labelsize=7)
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("seconds", fontsize=8)
    fig.suptitle("tidelog dashboard (deploy/grafana/tidelog.json) rendered from Prometheus")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


def http_query_range(url: str) -> QueryRange:
    import urllib.parse
    import urllib.request

    def query_range(expr: str, start: float, end: float, step: float) -> Any:
        params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
        with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=30) as r:
            return json.load(r)["data"]["result"]

    return query_range


def failover(out: Path, phase_s: float) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.support.promproc import Prometheus, compose_nodes, create_topic
    from tidelog.client import SyncConsumer, SyncProducer, TopicPartition

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        nodes = compose_nodes(base)
        prom = Prometheus(base, [f"127.0.0.1:{n.metrics_port}" for n in nodes.values()])
        stop = threading.Event()
        try:
            for n in nodes.values():
                n.start()
            for n in nodes.values():
                n.wait_serving()
            prom.start()
            boot = ",".join(n.address for n in nodes.values())
            create_topic(boot, "orders", 6)

            def load() -> None:  # bounded: stops with the run, at most 200 records/s
                with SyncProducer(boot) as producer, SyncConsumer(boot) as consumer:
                    consumer.assign([TopicPartition("orders", p) for p in range(6)])
                    while not stop.is_set():
                        futures = [producer.send("orders", b"x" * 200) for _ in range(20)]
                        for f in futures:
                            try:
                                f.result(timeout=30)
                            except Exception:
                                pass
                        consumer.poll(timeout_ms=50)
                        time.sleep(0.1)

            worker = threading.Thread(target=load, daemon=True)
            worker.start()
            # The panels' rates look back 1 minute: before a minute of data they ramp up.
            time.sleep(WARMUP_S)
            start = time.time()
            time.sleep(phase_s)
            marks = {"kill node 3": time.time()}
            nodes[3].kill()
            time.sleep(phase_s)
            marks["restart node 3"] = time.time()
            nodes[3].start()
            nodes[3].wait_serving()
            time.sleep(phase_s)
            end = time.time()
            stop.set()
            worker.join(timeout=30)
            names = {f"127.0.0.1:{n.metrics_port}": f"node {i}" for i, n in nodes.items()}
            plot(prom.query_range, start, end, out, marks, names)
        finally:
            stop.set()
            prom.stop()
            for n in nodes.values():
                n.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prometheus", default="http://127.0.0.1:9090")
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "dashboard.png")
    p.add_argument("--failover", action="store_true", help="Run the local kill-and-restart.")
    p.add_argument("--phase-seconds", type=float, default=40, help="With --failover.")
    args = p.parse_args()
    if args.failover:
        failover(args.out, args.phase_seconds)
        return
    end = time.time()
    plot(http_query_range(args.prometheus), end - 60 * args.minutes, end, args.out, {})


if __name__ == "__main__":
    main()
