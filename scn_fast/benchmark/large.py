"""``scn-fast bench --large``: the plan stated before the sweep, and its table and plots after.

* ``describe_plan``: per point, atoms, edges, the baseline the estimate chose, the paths it will
  not run (their records say why), the repeats that fit the point's time budget and its estimated minutes
  (``baseline.decide_point``; an idle machine), then the total. Printed before anything runs.
* ``DIR/large_table.md``: one row per (config, mode, size, path, precision): status, seconds per
  step (median of the timed repeats) and how many repeats, atoms x steps per second, activation
  memory of one step (``peak_mem_bytes``: GPU allocator peak, or CPU peak RSS during the step minus
  RSS before it), the point process's peak RSS (CPU: every path and the baseline of that point
  together), the baseline and the trust flag. Made for the README's performance section.
* ``DIR/large_time_vs_natoms.png``, ``DIR/large_memory_vs_natoms.png``: one panel per (config,
  mode), one line per (path, precision), log-log; memory: activation memory per path (solid) and
  the point's peak RSS (dotted, grey). The reference's first point that ran out of memory (status
  ``oom``) or that the estimate did not run (``skipped``) is marked with an x at its estimated
  value. Skipped, with a message, when matplotlib is not installed.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

TABLE = "large_table.md"
PLOT_TIME = "large_time_vs_natoms.png"
PLOT_MEMORY = "large_memory_vs_natoms.png"


def describe_plan(plan) -> str:
    """The lines stated before a ``--large`` sweep (module doc)."""
    from .runner import _START_S

    budget = plan.budget_s
    mem = plan._mem_at_start
    lines = [
        "plan of the size sweep (estimates for an idle machine, scn_fast/benchmark/estimate.py; "
        f"memory planned from {'-' if mem is None else f'{mem / 1e9:.1f} GB'} available, "
        f"point budget {'none' if budget is None else f'{budget / 60:.0f} min'}):",
        f"  {'config':<10} {'size':>6} {'atoms':>6} {'edges':>7}  {'baseline':<15} "
        f"{'repeats':>7} {'est. min':>8}  paths not run (estimate)",
    ]
    total = 0.0
    for preset in plan.presets:
        for size in plan.sizes:
            d = plan.planned(preset, size)
            ps = plan.size_of(preset, size)
            minutes = (d.seconds + _START_S) / 60
            total += minutes
            skipped = ", ".join(f"{m} {p} {q}" for m, p, q in sorted(d.not_run)) or "-"
            lines.append(
                f"  {preset:<10} {size:>6} {ps.natoms:>6} {ps.nedges:>7}  "
                f"{d.baseline or 'none fits':<15} {d.repeats:>7} {minutes:>8.1f}  {skipped}"
            )
    lines.append(f"  total: about {total:.0f} min on an idle machine (more on a busy one)")
    return "\n".join(lines)


def _mem(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e9:.2f} GB" if value >= 1e8 else f"{value / 1e6:.0f} MB"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(results: dict[str, Any]) -> str:
    """The markdown table of module doc, with a line naming the hardware, threads and commit."""
    meta = results.get("metadata", {})
    recs = sorted(
        results["records"],
        key=lambda r: (r["config"], r["mode"], r["natoms"] or 0, r["backend"], r["precision"]),
    )
    commits = sorted({(r.get("git_commit") or "unknown")[:7] for r in recs}) or [
        (meta.get("git_commit") or "unknown")[:7]
    ]
    dirty = any(r.get("git_dirty") for r in recs) or meta.get("git_dirty")
    commit = ", ".join(commits) + (" (uncommitted changes)" if dirty else "")
    devices = sorted({r["device"] for r in recs if r.get("device")}) or [meta.get("device", "?")]
    lines = [
        f"{'; '.join(devices)}, {meta.get('threads', '?')} threads, started "
        f"{meta.get('started', '?')}, commit {commit}; load average at start "
        f"{_num(meta.get('load_average_at_start'), '.1f')} on {meta.get('cores', '?')} cores",
        "",
        "| config | mode | atoms | edges | path | status | s / step (repeats) | atom-steps / s "
        "| activation memory | point peak RSS | baseline | trust |",
        "|---|---|---:|---:|---|---|---:|---:|---:|---:|---|---|",
    ]
    notes: list[str] = []
    for r in recs:
        why = r.get("reason") if r["status"] != "ok" else r.get("noise")
        mark = ""
        if why:
            notes.append(why)
            mark = f" [{len(notes)}]"
        time_ = "-"
        if r.get("median_s") is not None:
            time_ = f"{r['median_s']:.3g} ({r.get('repeats') or len(r.get('times_s') or [])})"
        trust = {True: "noisy", False: "ok", None: "-"}[r.get("noisy")]
        path = r["backend"] + ("" if r["precision"] == "fp32" else f" {r['precision']}")
        lines.append(
            f"| {r['config']} | {r['mode']} | {r['natoms']} | {r.get('nedges') or '-'} | {path} "
            f"| {r['status']}{mark} | {time_} | {_num(r.get('atom_steps_per_s'), '.3g')} "
            f"| {_mem(r.get('peak_mem_bytes'))} | {_mem(r.get('point_peak_rss_bytes'))} "
            f"| {r.get('baseline') or '-'} | {trust} |"
        )
    if notes:
        lines.append("")
        lines.extend(f"[{i}] {n}" for i, n in enumerate(notes, 1))
    return "\n".join(lines)


def reference_limits(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (config, mode), the reference's (float32) first record that ran out of memory or that the
    estimate did not run: the point to mark in the plots."""
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        if (r["backend"], r["precision"]) != ("reference", "fp32"):
            continue
        if r["status"] not in ("oom", "skipped"):
            continue
        key = (r["config"], r["mode"])
        if key not in first or r["natoms"] < first[key]["natoms"]:
            first[key] = r
    return first


def write_plots(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """The two PNGs of the module doc; [] (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "scn-fast bench --large: matplotlib is not installed, so no plots were written "
            "(pip install matplotlib); the table is in " + TABLE
        )
        return []
    ok = [r for r in records if r["status"] == "ok" and r.get("median_s") is not None]
    panels = sorted({(r["config"], r["mode"]) for r in records})
    if not panels:
        return []
    limits = reference_limits(records)
    written = []
    for filename, what in ((PLOT_TIME, "time"), (PLOT_MEMORY, "memory")):
        ncols = min(2, len(panels))
        nrows = (len(panels) + ncols - 1) // ncols
        fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4 * nrows), squeeze=False)
        for ax, (config, mode) in zip(axes.flat, panels, strict=False):
            _panel(ax, what, [r for r in ok if (r["config"], r["mode"]) == (config, mode)])
            lim = limits.get((config, mode))
            if lim is not None:
                _mark_limit(ax, what, lim)
            ax.set_title(f"{config}, {mode}")
            ax.set_xlabel("atoms")
            ax.set_ylabel("seconds per step" if what == "time" else "GB")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        device = (records[0].get("device") if records else None) or ""
        fig.suptitle(f"scn_fast bench --large: {what} vs atoms ({device})", fontsize=9)
        fig.tight_layout()
        path = out / filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _panel(ax, what: str, recs: list[dict[str, Any]]) -> None:
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    rss: dict[int, float] = {}
    for r in recs:
        name = f"{r['backend']} {r['precision']}"
        if what == "time":
            series[name].append((r["natoms"], r["median_s"]))
        else:
            if r.get("peak_mem_bytes") is not None:
                series[f"{name}, activations"].append((r["natoms"], r["peak_mem_bytes"] / 1e9))
            if r.get("point_peak_rss_bytes") is not None:
                rss[r["natoms"]] = max(rss.get(r["natoms"], 0.0), r["point_peak_rss_bytes"] / 1e9)
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if rss:
        xs = sorted(rss)
        ax.plot(xs, [rss[x] for x in xs], ls=":", color="grey", marker=".",
                label="point process peak RSS (all paths)")  # fmt: skip
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullLocator

    xs = sorted({p[0] for pts in series.values() for p in pts} | set(rss))
    if xs and max(xs) > 4 * min(xs):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_locator(NullLocator())
    if xs:
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_locator(NullLocator())


def _mark_limit(ax, what: str, rec: dict[str, Any]) -> None:
    """An x at the reference's first out-of-memory / not-run point, at its estimated value."""
    est = rec.get("estimate") or {}
    y = est.get("seconds") if what == "time" else est.get("activation_gb")
    label = (
        "reference: out of memory" if rec["status"] == "oom" else "reference: not run (estimate)"
    )
    if y is None:
        ax.axvline(rec["natoms"], color="red", ls="--", lw=0.8, label=label)
        return
    ax.plot([rec["natoms"]], [y], marker="x", ms=10, mew=2, color="red", ls="none",
            label=f"{label}, estimated {y:.3g}{' s' if what == 'time' else ' GB'}")  # fmt: skip


def write_all(results: dict[str, Any], out: Path | str) -> dict[str, Any]:
    """Write the markdown table and the plots into ``out``; print the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    path = out / TABLE
    path.write_text(table + "\n")
    pngs = write_plots(results["records"], out)
    print()
    print(table)
    print(f"\nwrote {path}" + "".join(f", {p.name}" for p in pngs))
    return {"table": path, "plots": pngs}


def main(argv: list[str] | None = None) -> int:
    """``python -m scn_fast.benchmark.large OUT RESULTS.json [RESULTS.json ...]``: the table and plots
    of the records of one or more runs together (e.g. a sweep and a single large point), metadata
    of the first."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m scn_fast.benchmark.large", description=main.__doc__)
    p.add_argument("out", help="output directory")
    p.add_argument("results", nargs="+", help="results.json files of scn-fast bench runs")
    args = p.parse_args(argv)
    runs = [json.loads(Path(f).read_text()) for f in args.results]
    merged = {
        "metadata": runs[0].get("metadata", {}),
        "records": [r for run in runs for r in run["records"]],
    }
    write_all(merged, args.out)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
