#!/usr/bin/env python3
"""Strong-scaling plots from the benchmark's JSONL records.

    python3 scripts/plot_scaling.py runs.jsonl [more.jsonl ...] [--out-dir DIR]
    python3 scripts/plot_scaling.py --self-test

Reads the `batch_latency` records that `yalis --output-json` appends (fields layout.tp,
layout.pp, layout.world_size, model, config.batch_size/input_len/output_len,
results.batch_latency_ms.mean, results.decode_step_ms.p50) and draws, against the GPU count
(world size), one line per (model, batch size, input/output length, PP degree):

    batch_latency.png   mean batch latency, ms
    decode_step.png     median decode step, ms
    efficiency.png      strong-scaling efficiency of the batch latency: T(n0) * n0 / (T(n) * n),
                        against the same workload (model, batch, lengths) on the fewest GPUs n0
                        of any PP degree (1.0 is perfect scaling)

Repeated configurations are averaged. --self-test writes a small JSONL, plots it and checks the
PNGs exist (no pytest needed).
"""

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict

PNGS = ("batch_latency.png", "decode_step.png", "efficiency.png")


def read_records(path, kind, tool="plot_scaling"):
    """The records of `kind` in one JSONL file (a record without a kind counts as batch_latency);
    a bad line names its place."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"{tool}: {path}:{n}: not JSON: {e}")
            if r.get("kind", "batch_latency") == kind:
                records.append(r)
    return records


def load(paths):
    """The batch-latency records of the files, skipping other kinds."""
    return [r for path in paths for r in read_records(path, "batch_latency")]


def series(records):
    """{(model, batch, input, output, pp): {gpus: (latency ms, decode ms)}}, averaged."""
    acc = defaultdict(lambda: defaultdict(list))
    for r in records:
        try:
            lay, cfg, res = r["layout"], r["config"], r["results"]
            key = (r["model"], cfg["batch_size"], cfg["input_len"], cfg["output_len"], lay["pp"])
            gpus = lay.get("world_size", lay["tp"] * lay["pp"])
            acc[key][gpus].append((res["batch_latency_ms"]["mean"], res["decode_step_ms"]["p50"]))
        except (KeyError, TypeError) as e:
            sys.exit(f"plot_scaling: a record lacks {e}: {json.dumps(r)[:200]}")
    out = {}
    for key, by_gpus in acc.items():
        out[key] = {
            g: (sum(v[0] for v in vals) / len(vals), sum(v[1] for v in vals) / len(vals))
            for g, vals in by_gpus.items()
        }
    return out


def label(key):
    model, batch, inp, outp, pp = key
    return f"{model} bs={batch} in={inp} out={outp} PP={pp}"


def plot(records, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = series(records)
    if not lines:
        sys.exit("plot_scaling: no batch_latency records")
    os.makedirs(out_dir, exist_ok=True)
    gpu_ticks = sorted({g for pts in lines.values() for g in pts})
    panels = [
        ("batch_latency.png", "batch latency (mean), ms", lambda pts, g: pts[g][0], True),
        ("decode_step.png", "decode step (p50), ms", lambda pts, g: pts[g][1], True),
        ("efficiency.png", "strong-scaling efficiency", None, False),
    ]
    # The strong-scaling baseline of a workload: its fastest run on the fewest GPUs, any PP.
    base = {}
    for key, pts in lines.items():
        g0 = min(pts)
        b = base.get(key[:4])
        if b is None or g0 < b[0] or (g0 == b[0] and pts[g0][0] < b[1]):
            base[key[:4]] = (g0, pts[g0][0])
    written = []
    for name, ylabel, value, log_y in panels:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key in sorted(lines):
            pts = lines[key]
            gs = sorted(pts)
            if value is None:
                g0, t0 = base[key[:4]]
                ys = [t0 * g0 / (pts[g][0] * g) for g in gs]
            else:
                ys = [value(pts, g) for g in gs]
            ax.plot(gs, ys, marker="o", label=label(key))
        if value is None:
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
            ax.set_ylim(bottom=0)
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_xticks(gpu_ticks)
        ax.set_xticklabels([str(g) for g in gpu_ticks])
        ax.set_xlabel("GPUs (TP x PP)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def self_test():
    """A small JSONL shaped like the benchmark's, plotted; the PNGs must exist and be PNGs."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "runs.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for model, base in (("llama-3.1-70b", 900.0), ("llama-3.1-405b", 4000.0)):
                for pp in (1, 2):
                    for tp in (4, 8, 16):
                        for batch in (1, 8):
                            n = tp * pp
                            lat = base * batch**0.2 / n**0.8
                            for rep in range(2):  # repeats are averaged
                                rec = {
                                    "kind": "batch_latency",
                                    "model": model,
                                    "layout": {"tp": tp, "pp": pp, "world_size": n},
                                    "config": {"batch_size": batch, "input_len": 1024, "output_len": 128},
                                    "results": {
                                        "batch_latency_ms": {"mean": lat * (1 + 0.01 * rep)},
                                        "decode_step_ms": {"p50": lat / 130},
                                    },
                                }
                                f.write(json.dumps(rec) + "\n")
            f.write(json.dumps({"kind": "generate", "model": "x"}) + "\n")  # skipped
        records = load([path])
        assert len(records) == 2 * 2 * 3 * 2 * 2, len(records)
        lines = series(records)
        assert len(lines) == 2 * 2 * 2, len(lines)
        pts = lines[("llama-3.1-70b", 1, 1024, 128, 1)]
        assert sorted(pts) == [4, 8, 16], pts
        assert abs(pts[4][0] - 900.0 / 4**0.8 * 1.005) < 1e-6, pts
        out = os.path.join(tmp, "plots")
        written = plot(records, out)
        for name in PNGS:
            p = os.path.join(out, name)
            assert p in written, written
            with open(p, "rb") as f:
                head = f.read(8)
            assert head == b"\x89PNG\r\n\x1a\n", f"{p} is not a PNG"
            assert os.path.getsize(p) > 1000, f"{p} is nearly empty"
    print("plot_scaling: self-test passed (3 PNGs from a synthetic JSONL)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jsonl", nargs="*", help="JSONL files written by yalis --output-json")
    ap.add_argument("--out-dir", help="where the PNGs go (default: beside the first JSONL)")
    ap.add_argument("--self-test", action="store_true", help="plot a synthetic JSONL and check the PNGs")
    a = ap.parse_args()
    if a.self_test:
        self_test()
        return
    if not a.jsonl:
        ap.error("give one or more JSONL files, or --self-test")
    out_dir = a.out_dir or os.path.dirname(os.path.abspath(a.jsonl[0]))
    for p in plot(load(a.jsonl), out_dir):
        print(p)


if __name__ == "__main__":
    main()
