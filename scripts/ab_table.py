#!/usr/bin/env python3
"""The A/B table of batch-latency runs: for each batch size, every variant's mean batch latency
and median decode step, and the first variant's latency over the second's.

    scripts/ab_table.py nccl=out/llama70b-tp4-nccl.jsonl nvrar=out/llama70b-tp4-nvrar.jsonl
    scripts/ab_table.py --self-test

Each argument is LABEL=PATH of a JSONL written by `yalis --output-json` (kind batch_latency).
"""
import json
import sys
import tempfile


def table(variants):
    """Lines of the table for [(label, path)]."""
    rows = {}
    for label, path in variants:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                rows.setdefault(r["config"]["batch_size"], {})[label] = r["results"]
    labels = [label for label, _ in variants]
    ratio = f"{labels[0]}/{labels[1]}" if len(labels) > 1 else ""
    out = [f"{'batch':>5} " + " ".join(f"{l + ' ms':>12} {l + ' step':>10}" for l in labels) + f"   {ratio}"]
    for bs in sorted(rows):
        r = rows[bs]
        cells = " ".join(
            f"{r[l]['batch_latency_ms']['mean']:12.1f} {r[l]['decode_step_ms']['p50']:10.3f}" if l in r else f"{'-':>12} {'-':>10}"
            for l in labels
        )
        x = ""
        if len(labels) > 1 and {labels[0], labels[1]} <= r.keys():
            x = f"{r[labels[0]]['batch_latency_ms']['mean'] / r[labels[1]]['batch_latency_ms']['mean']:.3f}x"
        out.append(f"{bs:>5} {cells}   {x}")
    return out


def self_test():
    def rec(bs, ms, step):
        return json.dumps({"config": {"batch_size": bs},
                           "results": {"batch_latency_ms": {"mean": ms}, "decode_step_ms": {"p50": step}}})
    with tempfile.TemporaryDirectory() as d:
        a, b = f"{d}/a.jsonl", f"{d}/b.jsonl"
        open(a, "w").write(rec(8, 200.0, 2.0) + "\n" + rec(1, 100.0, 1.0) + "\n")
        open(b, "w").write(rec(1, 80.0, 0.8) + "\n")
        lines = table([("a", a), ("b", b)])
        assert lines[0].split()[-1] == "a/b", lines
        assert lines[1].split()[0] == "1" and lines[1].endswith("1.250x"), lines
        assert lines[2].split()[0] == "8" and " - " in lines[2] and not lines[2].endswith("x"), lines
    print("ab_table self-test: ok")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["--self-test"]:
        self_test()
    elif args and all("=" in a for a in args):
        print("\n".join(table([tuple(a.split("=", 1)) for a in args])))
    else:
        sys.exit(__doc__)
