"""Markdown tables from a pytest-benchmark JSON file: python bench/report.py out.json"""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    data = json.load(open(path))
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    print(f"machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}; "
          f"date: {data['datetime'][:10]}")  # fmt: skip
    for group, rows in groups.items():
        rows.sort(key=lambda b: b["stats"]["median"])
        base = next((b for b in rows if b["param"] == "torch-eager"), rows[0])
        t0, m0 = base["stats"]["median"], base["extra_info"].get("peak_extra_mb")
        print(f"\n### {group}\n")
        print("| provider | device | median ms | vs eager time | peak extra MiB | vs eager mem "
              "| TFLOP/s |")  # fmt: skip
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for b in rows:
            t, mem = b["stats"]["median"], b["extra_info"].get("peak_extra_mb")
            ratio = f"{mem / m0:.3f}" if mem is not None and m0 else "-"
            info = b["extra_info"]
            print(f"| {b['param']} | {info.get('device', '?')} | {t * 1e3:.1f} | {t / t0:.2f} | "
                  f"{mem} | {ratio} | {info.get('tflops', '-')} |")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
