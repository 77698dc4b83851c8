#!/usr/bin/env python3
"""The A/B table of batch-latency runs: for each batch size, every variant's mean batch latency,
median decode step and that step over its bound (weights at the copy rate + the all-reduces timed
alone; "-" where the run has none), and the first variant's latency and step over the second's.

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
    ratio = f"{labels[0]}/{labels[1]} (latency, step)" if len(labels) > 1 else ""
    head = " ".join(f"{l + ' ms':>12} {l + ' step':>10} {'/bound':>6}" for l in labels)
    out = [f"{'batch':>5} {head}   {ratio}"]

    def cell(res):
        if res is None:
            return f"{'-':>12} {'-':>10} {'-':>6}"
        bound = (res.get("all_reduce") or {}).get("step_over_bound")
        bound = f"{bound:6.3f}" if bound is not None else f"{'-':>6}"
        return f"{res['batch_latency_ms']['mean']:12.1f} {res['decode_step_ms']['p50']:10.3f} {bound}"

    for bs in sorted(rows):
        r = rows[bs]
        x = ""
        if len(labels) > 1 and {labels[0], labels[1]} <= r.keys():
            a, b = r[labels[0]], r[labels[1]]
            x = (f"{a['batch_latency_ms']['mean'] / b['batch_latency_ms']['mean']:.3f}x "
                 f"{a['decode_step_ms']['p50'] / b['decode_step_ms']['p50']:.3f}x")
        out.append(f"{bs:>5} {' '.join(cell(r.get(l)) for l in labels)}   {x}")
    return out


def self_test():
    def rec(bs, ms, step, bound=None):
        res = {"batch_latency_ms": {"mean": ms}, "decode_step_ms": {"p50": step}}
        if bound is not None:
            res["all_reduce"] = {"step_over_bound": bound}
        return json.dumps({"config": {"batch_size": bs}, "results": res})
    with tempfile.TemporaryDirectory() as d:
        a, b = f"{d}/a.jsonl", f"{d}/b.jsonl"
        open(a, "w").write(rec(8, 200.0, 2.0) + "\n" + rec(1, 100.0, 1.0, 1.3) + "\n")
        open(b, "w").write(rec(1, 80.0, 0.5) + "\n")
        lines = table([("a", a), ("b", b)])
        assert "a/b" in lines[0], lines
        assert lines[1].split()[0] == "1" and lines[1].endswith("1.250x 2.000x"), lines
        assert lines[1].split()[3] == "1.300" and lines[1].split()[6] == "-", lines
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
