#!/usr/bin/env python3
"""Draws docs/benchmarks.png from docs/benchmarks.json (written by bench/bench.py).

Three panels sharing one row per configuration: throughput at saturation (median, min–max
bar), the proxy's CPU time per request, and latency at a fixed rate (p50 bar, p99 tick).
api-guard rows are orange (the wasm filter) and red (the dynamic module), Envoy's native
filters blue, references grey.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"plain": "#9e9e9e", "wasm-noop": "#c7c7c7", "native": "#1f77b4",
          "api-guard": "#ff7f0e", "api-guard-module": "#d62728"}


def main(src, dst):
    res = json.load(open(src))
    by = {c["id"]: c for c in res["cases"] if c.get("rps") is not None}
    # Rows in group order (api-guard last in each group), then anything not in a group.
    order = []
    for _title, plain, natives, ag in res["groups"]:
        # The dynamic module's twin of each api-guard case follows it ("ag-x" → "mod-x").
        for cid in [plain] + natives + [ag, "mod" + ag[2:]]:
            if cid in by and cid not in order:
                order.append(cid)
    for cid in by:
        if cid not in order:
            order.insert(1 if cid == "noop-wasm" else len(order), cid)
    rows = [by[c] for c in order]
    labels = [c["label"] for c in rows]
    colors = [COLORS.get(c["kind"], "#555") for c in rows]
    y = list(range(len(rows)))[::-1]

    fig, axes = plt.subplots(1, 3, figsize=(15, 0.42 * len(rows) + 1.8), sharey=True)
    ax = axes[0]
    rps = [c["rps"] / 1000 for c in rows]
    err = [[(c["rps"] - c["rps_min"]) / 1000 for c in rows],
           [(c["rps_max"] - c["rps"]) / 1000 for c in rows]]
    ax.barh(y, rps, color=colors, xerr=err, capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("thousand requests/s at saturation (median, min–max)")
    for yi, v, c in zip(y, rps, rows):
        ax.text(c["rps_max"] / 1000, yi, f" {v:.1f}k", va="center", fontsize=7)

    ax = axes[1]
    cpu = [c["cpu_us_per_req"] for c in rows]
    cerr = [[c["cpu_us_per_req"] - c["cpu_min"] for c in rows],
            [c["cpu_max"] - c["cpu_us_per_req"] for c in rows]]
    ax.barh(y, cpu, color=colors, xerr=cerr, capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xlabel("proxy CPU µs per request (lower is better)")
    for yi, v, c in zip(y, cpu, rows):
        ax.text(c["cpu_max"], yi, f" {v:.0f}", va="center", fontsize=7)

    ax = axes[2]
    p50 = [c.get("fr_p50_us") or 0 for c in rows]
    p99 = [c.get("fr_p99_us") or 0 for c in rows]
    ax.barh(y, p50, color=colors)
    ax.scatter(p99, y, marker="|", s=120, color="black", label="p99")
    ax.set_xscale("log")
    frs = sorted(c["fr_rps"] for c in rows if c.get("fr_rps"))
    rate = f"~{frs[len(frs) // 2]:.0f} req/s" if frs else "fixed rate"
    ax.set_xlabel(f"latency at {rate}, µs (bar p50, tick p99; log)")
    ax.legend(loc="lower right", fontsize=7)

    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    m = res["machine"]
    fig.suptitle(f"api-guard vs Envoy native filters — Envoy {m['envoy'].split('/')[1] if '/' in m['envoy'] else m['envoy']}, "
                 f"--concurrency 1, {m['cores']} cores, {res['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
