#!/usr/bin/env python3
"""All-reduce plots from `yalis bench-allreduce --output-json` records.

    python3 scripts/plot_allreduce.py sweep.jsonl [more.jsonl ...] [--out-dir DIR]
    python3 scripts/plot_allreduce.py --self-test

Reads the `all_reduce` records (config.backend, config.backend_detail, config.bytes,
config.ranks, results.us_per_call, results.wrong) and draws, one line per run and backend
(file name, ranks, backend detail):

    allreduce_latency.png   time per call (us) against the message size, both axes log
    allreduce_speedup.png   NCCL's time / the backend's, for every non-NCCL backend whose file
                            has NCCL at the same size (the same run: the only fair ratio)

A record with wrong elements is drawn with a red cross and reported. --self-test writes a small
JSONL, plots it and checks the PNGs exist (no pytest needed).
"""

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plot_scaling import read_records  # noqa: E402  (the one JSONL reader of the plot scripts)

PNGS = ("allreduce_latency.png", "allreduce_speedup.png")


def load(paths):
    """{(file, ranks, detail): {bytes: (us, wrong)}} and {(file, ranks): {bytes: nccl us}}."""
    series = defaultdict(dict)
    nccl = defaultdict(dict)
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        for r in read_records(path, "all_reduce", "plot_allreduce"):
            c, res = r["config"], r["results"]
            key = (name, c["ranks"], c.get("backend_detail") or c["backend"])
            series[key][c["bytes"]] = (res["us_per_call"], res["wrong"])
            if c["backend"] == "nccl":
                nccl[(name, c["ranks"])][c["bytes"]] = res["us_per_call"]
    if not series:
        sys.exit("no all_reduce records in " + ", ".join(paths))
    return series, nccl


def size_label(b):
    return f"{b >> 20}M" if b >= 1 << 20 else f"{b >> 10}K" if b >= 1 << 10 else str(b)


def save(plt, fig, ax, ylabel, title, path):
    """Log-2 size axis, labels, grid and legend; writes the PNG and closes the figure."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message (bytes)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(paths, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series, nccl = load(paths)
    os.makedirs(out_dir, exist_ok=True)
    wrong = []
    fig, ax = plt.subplots(figsize=(9, 6))
    for (name, ranks, detail), pts in sorted(series.items()):
        xs = sorted(pts)
        ax.plot(xs, [pts[x][0] for x in xs], marker="o", ms=3, label=f"{name}: {detail}")
        bad = [x for x in xs if pts[x][1]]
        if bad:
            ax.plot(bad, [pts[x][0] for x in bad], "rx", ms=10)
            wrong += [f"{name} {detail} at {size_label(x)}" for x in bad]
    ax.set_yscale("log")
    save(plt, fig, ax, "time per call (us)", "all-reduce latency", os.path.join(out_dir, PNGS[0]))

    fig, ax = plt.subplots(figsize=(9, 6))
    for (name, ranks, detail), pts in sorted(series.items()):
        base = nccl.get((name, ranks), {})
        xs = sorted(x for x in pts if x in base)
        if not xs or detail == "nccl":
            continue
        ax.plot(xs, [base[x] / pts[x][0] for x in xs], marker="o", ms=3, label=f"{name}: {detail}")
    ax.axhline(1.0, color="k", lw=0.8)
    save(plt, fig, ax, "NCCL time / this backend's (same run)", "speed-up over NCCL", os.path.join(out_dir, PNGS[1]))
    for w in wrong:
        print(f"plot_allreduce: wrong sums recorded: {w}", file=sys.stderr)
    return [os.path.join(out_dir, p) for p in PNGS]


def self_test():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "sweep.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for b in (8192, 131072, 2 << 20):
                for backend, us in (("nccl", 10 + b / 1e5), ("nvrar", 5 + b / 2e5)):
                    f.write(json.dumps({
                        "kind": "all_reduce",
                        "config": {"backend": backend, "backend_detail": backend, "bytes": b, "ranks": 4},
                        "results": {"us_per_call": us, "wrong": 0},
                    }) + "\n")
            f.write(json.dumps({"kind": "batch_latency"}) + "\n")
        series, nccl = load([path])
        assert len(series) == 2 and len(nccl[("sweep", 4)]) == 3, (series, nccl)
        for png in plot([path], os.path.join(d, "out")):
            assert os.path.getsize(png) > 1000, png
    print("plot_allreduce self-test: ok")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("jsonl", nargs="*")
    ap.add_argument("--out-dir", default=".")
    ap.add_argument("--self-test", action="store_true")
    a = ap.parse_args()
    if a.self_test:
        self_test()
        return
    if not a.jsonl:
        ap.error("give one or more JSONL files (or --self-test)")
    for png in plot(a.jsonl, a.out_dir):
        print(png)


if __name__ == "__main__":
    main()
