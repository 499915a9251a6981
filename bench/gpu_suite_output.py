"""What ``bench/gpu_suite.sh`` leaves in OUTDIR, and the limits it must respect.

OUTDIR receives at most ``MAX_FILES`` (8) files, each at most ``MAX_FILE_BYTES`` (16 MB), no folder:

* ``results.json``  {"metadata": {...the run: commit, device, versions, stages...}, "smoke": [records],
                    "records": [benchmark records], "ops": [op benchmark summaries], "pytest": {...}}
* ``table.txt``     the stage summary, the smoke table (with ``model.explain()`` of every path, as
                    JSON), the benchmark table (``scn_fast.benchmark.report.format_table``), the op table
* three PNGs         ``scn_fast.benchmark.report.write_plots`` of the benchmark records
* ``logs.tar.gz``   every log of the run (stages, benchmark points, the build), packed again after
                    each stage so that a run cut short still leaves its logs

``check_outdir`` verifies the limits (the rehearsal enforces them; tests call it).
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from scn_fast.benchmark.noise import NOISY_SPREAD

MAX_FILES = 8
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 2  # folders below OUTDIR (this kit writes none)
LOG_TAIL_BYTES = 1024 * 1024  # per log, when the packed logs would exceed MAX_FILE_BYTES


def check_outdir(outdir: Path) -> list[str]:
    """Violations of the OUTDIR limits (module doc): [] when there are none."""
    problems = []
    files = [p for p in outdir.rglob("*") if not p.is_dir()]
    if len(files) > MAX_FILES:
        problems.append(
            f"{len(files)} files (at most {MAX_FILES}): {sorted(p.name for p in files)}"
        )
    for p in files:
        rel = p.relative_to(outdir)
        if p.is_symlink() or not p.is_file():
            problems.append(f"{rel}: not a plain file")
        elif p.stat().st_size > MAX_FILE_BYTES:
            problems.append(f"{rel}: {p.stat().st_size} bytes (at most {MAX_FILE_BYTES})")
        if len(rel.parts) - 1 > MAX_DEPTH:
            problems.append(f"{rel}: more than {MAX_DEPTH} folders deep")
    return problems


def _add_tail(tar: tarfile.TarFile, path: Path, arcname: str, limit: int | None) -> None:
    data = path.read_bytes()
    if limit is not None and len(data) > limit:
        data = b"[... truncated to its last %d bytes ...]\n" % limit + data[-limit:]
    info = tarfile.TarInfo(arcname)
    info.size, info.mtime = len(data), int(path.stat().st_mtime)
    tar.addfile(info, io.BytesIO(data))


def pack_logs(sources: list[tuple[Path, str]], dest: Path) -> Path:
    """Pack every file under each (folder, name in the archive) of ``sources`` into ``dest`` (a
    .tar.gz); when that exceeds MAX_FILE_BYTES, pack again with each file cut to its last
    LOG_TAIL_BYTES. Written to a temporary name first, so ``dest`` is never half-written."""
    tmp = dest.with_name(dest.name + ".tmp")
    for limit in (None, LOG_TAIL_BYTES):
        with tarfile.open(tmp, "w:gz") as tar:
            for folder, name in sources:
                if not folder.is_dir():
                    continue
                for p in sorted(folder.rglob("*")):
                    if p.is_file() and not p.is_symlink():
                        _add_tail(tar, p, f"logs/{name}/{p.relative_to(folder)}", limit)
        if tmp.stat().st_size <= MAX_FILE_BYTES:
            break
    tmp.replace(dest)
    return dest


# ----------------------------------------------------------------------------- ops (pytest-benchmark)
def ops_summary(benchmark_json: Path) -> list[dict[str, Any]]:
    """One dict per op benchmark of a ``--benchmark-json`` file: name, group, device, median/min/max
    seconds of its rounds, their spread ((max - min) / median), ``noisy`` (spread > 10%), and the
    activation memory the bench conftest records."""
    if not benchmark_json.is_file():
        return []
    data = json.loads(benchmark_json.read_text())
    out = []
    for b in data.get("benchmarks", []):
        st = b.get("stats", {})
        med, lo, hi = st.get("median"), st.get("min"), st.get("max")
        sp = (hi - lo) / med if med and lo is not None and hi is not None else None
        extra = b.get("extra_info", {})
        out.append(
            {
                "name": b.get("name"),
                "group": b.get("group"),
                "device": extra.get("device"),
                "median_s": st.get("median"),
                "min_s": st.get("min"),
                "max_s": st.get("max"),
                "rounds": st.get("rounds"),
                "spread": sp,
                "noisy": None if sp is None else sp > NOISY_SPREAD,
                "peak_mem_bytes": extra.get("peak_mem_bytes"),
            }
        )
    return out


def _table(head: str, body: Iterable[str]) -> str:
    """A text table: the header line, a rule as wide as it, then the body's lines."""
    return "\n".join([head, "-" * len(head), *body])


def format_ops(ops: list[dict[str, Any]]) -> str:
    if not ops:
        return "(no op benchmark ran)"

    def rows() -> Iterator[str]:
        for o in ops:
            sp = "-" if o["spread"] is None else f"{o['spread']:.0%}"
            trust = {True: "noisy", False: "ok", None: "-"}[o["noisy"]]
            med = "-" if o["median_s"] is None else f"{o['median_s']:.4g}"
            yield f"{o['name'][:58]:<58} {med:>10} {sp:>6} {trust:<5}"

    return _table(f"{'op benchmark':<58} {'median_s':>10} {'spread':>6} {'trust':<5}", rows())


# ----------------------------------------------------------------------------- smoke
def _err(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1e}"


def format_smoke(records: list[dict[str, Any]]) -> str:
    """The smoke table: one line per (backend, precision) with its errors against the float32
    reference, then that path's ``model.explain()`` as JSON (whatever its layout), and reasons."""
    if not records:
        return "(no smoke record)"
    head = (
        f"{'backend':<10} {'prec':<4} {'mode':<9} {'status':<6} {'E_err':>8} {'F_err':>8} "
        f"{'F_limit':>8} {'grad_err':>8}"
    )

    def rows() -> Iterator[str]:
        for r in records:
            yield (
                f"{r['backend']:<10} {r['precision']:<4} {r['mode']:<9} {r['status']:<6} "
                f"{_err(r.get('energy_err_rel')):>8} {_err(r.get('max_force_err_rel')):>8} "
                f"{_err(r.get('force_err_limit')):>8} {_err(r.get('max_grad_err_rel')):>8}"
            )
            if r.get("reason"):
                yield f"    reason: {r['reason']}"
            if r.get("explain") is not None:
                yield "    explain: " + json.dumps(r["explain"], sort_keys=True, default=str)

    return _table(head, rows())


# ----------------------------------------------------------------------------- stages
def format_stages(stages: list[dict[str, Any]]) -> str:
    head = (
        f"{'stage':<8} {'status':<9} {'elapsed_s':>9} {'ended_at_s':>10} {'deadline_s':>10}  note"
    )
    return _table(
        head,
        (
            f"{s['stage']:<8} {s['status']:<9} {s.get('elapsed_s', 0):>9.1f} "
            f"{s.get('ended_at_s', 0):>10.1f} {s.get('deadline_s', 0):>10.0f}  {s.get('note') or ''}"
            for s in stages
        ),
    )
