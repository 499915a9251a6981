"""Benchmark output: ``results.json``, a plain-text table, and PNG plots (matplotlib, Agg).

* ``DIR/results.json``: {"metadata": run metadata, "records": [records.RECORD_FIELDS dicts]}.
* the table (printed, also ``DIR/table.txt``): one line per record, with the spread of its repeats
  and ``trust`` (ok, or ``noisy``: see noise.py); reasons of records that are not ``ok`` and of noisy
  ones follow it, numbered.
* ``DIR/speedup_vs_natoms.png``, ``DIR/time_over_floor_vs_natoms.png``,
  ``DIR/activation_memory_vs_natoms.png``: one panel per (config, mode), one line per
  (backend, precision), ok records only. Skipped (with a note) when matplotlib is not installed.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

PLOTS = (
    ("speedup_vs_reference", "speedup vs float32 reference", "speedup_vs_natoms.png"),
    ("time_over_floor", "time / algebraic GEMM floor", "time_over_floor_vs_natoms.png"),
    ("peak_mem_bytes", "activation memory (GB)", "activation_memory_vs_natoms.png"),
)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _mem(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e9:.3g}GB" if value >= 1e9 else f"{value / 1e6:.3g}MB"


def format_table(records: list[dict[str, Any]]) -> str:
    """The plain-text table of ``records`` (see module doc)."""
    head = (
        f"{'config':<11} {'mode':<9} {'backend':<17} {'prec':<4} {'natoms':>6} {'status':<6} "
        f"{'median_s':>9} {'spread':>6} {'speedup':>7} {'t/floor':>7} {'memory':>8} {'E_err':>8} "
        f"{'F_err':>8} {'trust':<5}"
    )
    lines = [head, "-" * len(head)]
    notes: list[str] = []
    for r in records:
        mark = ""
        for why in (r.get("reason"), r.get("noise")):
            if why:
                notes.append(why)
                mark += f" [{len(notes)}]"
        trust = {True: "noisy", False: "ok", None: "-"}[r.get("noisy")]
        lines.append(
            f"{r['config']:<11} {r['mode']:<9} {r['backend']:<17} {r['precision']:<4} "
            f"{r['natoms'] if r['natoms'] is not None else '-':>6} {r['status']:<6} "
            f"{_num(r['median_s'], '.4g'):>9} {_pct(r.get('spread')):>6} "
            f"{_num(r['speedup_vs_reference'], '.3f'):>7} "
            f"{_num(r['time_over_floor'], '.3f'):>7} {_mem(r['peak_mem_bytes']):>8} "
            f"{_num(r['energy_err_rel'], '.1e'):>8} {_num(r['max_force_err_rel'], '.1e'):>8} "
            f"{trust:<5}{mark}"
        )
    noisy = sum(1 for r in records if r.get("noisy"))
    if noisy:
        lines.append("")
        lines.append(
            f"{noisy} of {sum(1 for r in records if r.get('noisy') is not None)} timed points are "
            "noisy (trust column): rerun them on an idle machine before quoting them"
        )
    if notes:
        lines.append("")
        lines.extend(f"[{i}] {n}" for i, n in enumerate(notes, 1))
    return "\n".join(lines)


def write_json(results: dict[str, Any], out: Path) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    return path


def _is_baseline(r: dict[str, Any]) -> bool:
    return r["backend"] == "reference" and r["precision"] == "fp32"


def write_plots(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """The PNGs of the module doc; [] when matplotlib is missing or no record is ok."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("scn-fast bench: matplotlib is not installed, no plots written")
        return []
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return []
    panels = sorted({(r["config"], r["mode"]) for r in ok})
    written = []
    for field_name, label, filename in PLOTS:
        ncols = 2
        nrows = (len(panels) + ncols - 1) // ncols
        fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3.6 * nrows), squeeze=False)
        for ax, (config, mode) in zip(axes.flat, panels, strict=False):
            series: dict[str, list[tuple[int, float]]] = defaultdict(list)
            for r in ok:
                if field_name == "speedup_vs_reference" and _is_baseline(r):
                    continue  # 1 by definition: the dashed line
                if (r["config"], r["mode"]) == (config, mode) and r[field_name] is not None:
                    value = r[field_name] / 1e9 if field_name == "peak_mem_bytes" else r[field_name]
                    series[f"{r['backend']} {r['precision']}"].append((r["natoms"], value))
            for name, pts in sorted(series.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            xs = sorted({p[0] for pts in series.values() for p in pts})
            if xs and max(xs) > 10 * min(xs):
                ax.set_xscale("log")
            if xs:
                ax.set_xticks(xs, [str(x) for x in xs])
                ax.minorticks_off()
            if field_name == "speedup_vs_reference":
                ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="float32 reference")
            ax.set_ylim(bottom=0)
            ax.set_title(f"{config}, {mode}")
            ax.set_xlabel("atoms")
            ax.set_ylabel(label)
            if series or field_name == "speedup_vs_reference":
                ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        device = ok[0].get("device") or ""
        fig.suptitle(f"scn_fast bench: {label} ({device})", fontsize=10)
        fig.tight_layout()
        path = out / filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_all(results: dict[str, Any], out: Path | str) -> dict[str, Any]:
    """Write results.json, table.txt and the plots into ``out``; print the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results["records"])
    (out / "table.txt").write_text(table + "\n")
    json_path = write_json(results, out)
    pngs = write_plots(results["records"], out)
    print()
    print(table)
    print(f"\nwrote {json_path}" + "".join(f", {p.name}" for p in pngs))
    meta = results.get("metadata", {})
    if meta.get("busy_warning"):
        print(meta["busy_warning"])
    if meta.get("stopped_early"):
        print(f"stopped early: {meta['stopped_early']}")
    return {"json": json_path, "plots": pngs}
