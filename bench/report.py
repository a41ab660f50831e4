"""Markdown tables from pytest-benchmark JSON files: python bench/report.py out.json [more.json ...]

Ratios are against each group's baseline: the first provider named in BASELINES that is present
(the eager reference of the op), else the fastest row."""

import json
import sys
from collections import defaultdict

BASELINES = ("torch-eager", "trl-eager", "torch-sort", "hf-generate")


def _baseline(rows):
    for name in BASELINES:
        for b in rows:
            if b["param"] == name or b["param"].endswith("-" + name):
                return b
    return rows[0]


def main(path: str) -> None:
    data = json.load(open(path))
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    print(f"machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}; "
          f"date: {data['datetime'][:10]}")  # fmt: skip
    for group, rows in groups.items():
        rows.sort(key=lambda b: b["stats"]["median"])
        base = _baseline(rows)
        t0, m0 = base["stats"]["median"], base["extra_info"].get("peak_extra_mb")
        print(f"\n### {group}\n")
        print(f"baseline: {base['param']}\n")
        print("| provider | device | median ms | vs baseline time | peak extra MiB "
              "| vs baseline mem | TFLOP/s |")  # fmt: skip
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for b in rows:
            t, mem = b["stats"]["median"], b["extra_info"].get("peak_extra_mb")
            ratio = f"{mem / m0:.3f}" if mem is not None and m0 else "-"
            info = b["extra_info"]
            print(f"| {b['param']} | {info.get('device', '?')} | {t * 1e3:.1f} | {t / t0:.2f} | "
                  f"{mem} | {ratio} | {info.get('tflops', '-')} |")  # fmt: skip


if __name__ == "__main__":
    for i, p in enumerate(sys.argv[1:]):
        if i:
            print()
        main(p)
