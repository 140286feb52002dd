"""Summary of one benchmarks/gpu_check.sh run: the aims of issue 12 checked against the JSON files of that run.

Aims (ratios and fractions measured in the same run, never absolute numbers from elsewhere):
  step      ours (bf16, channels_last; eager or compiled) >= 3x the reference-equivalent step, per classifier and batch
  mfu       model FLOP utilisation of the ours step >= 35% of the device's dense bf16 peak (best batch size)
  trainer   explainer/train.py's loop >= 90% of the bare ours step with the same settings

  python benchmarks/gpu_check_summary.py RESULTS_DIR     # -> RESULTS_DIR/summary.json (+ a table on stdout)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

AIMS = {"step_speedup": 3.0, "mfu": 0.35, "trainer_vs_bare": 0.90}


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def summarise(folder: Path) -> dict[str, Any]:
    eager, compiled = _load(folder / "step_eager.json"), _load(folder / "step_compiled.json")
    e2e, timing, env = _load(folder / "e2e.json"), _load(folder / "eval_timing.json"), _load(folder / "env.json")
    checks: list[dict[str, Any]] = []
    resume = _load(folder / "checkpoint_resume.json")
    missing = [name for name, part in [("step_eager.json", eager), ("step_compiled.json", compiled),
                                       ("e2e.json", e2e), ("eval_timing.json", timing),
                                       ("checkpoint_resume.json", resume)] if part is None]
    partial = [name for name, part in [("step_eager.json", eager), ("step_compiled.json", compiled),
                                       ("e2e.json", e2e)] if part is not None and part.get("partial")]
    step_rows = [r for part in (eager, compiled) if part for r in part["results"] if "images_per_s" in r]
    reference = {(r["classifier"], r["batch_size"]): r["images_per_s"] for r in step_rows if r["mode"] == "reference"}
    ours = [r for r in step_rows if r["mode"] == "ours"]
    for r in ours:
        ref = reference.get((r["classifier"], r["batch_size"]))
        if ref:
            checks.append({"aim": "step_speedup", "classifier": r["classifier"], "batch_size": r["batch_size"],
                           "compiled": r.get("compiled", "no"), "value": r["images_per_s"] / ref,
                           "target": AIMS["step_speedup"]})
    for classifier in sorted({r["classifier"] for r in ours}):
        rows = [r for r in ours if r["classifier"] == classifier and "mfu" in r]
        if rows:
            best = max(rows, key=lambda r: r["mfu"])
            checks.append({"aim": "mfu", "classifier": classifier, "batch_size": best["batch_size"],
                           "compiled": best.get("compiled", "no"), "value": best["mfu"], "target": AIMS["mfu"]})
    for r in (e2e or {}).get("e2e", []):
        if "trainer_vs_bare" in r:
            checks.append({"aim": "trainer_vs_bare", "classifier": r["classifier"], "batch_size": r["batch_size"],
                           "compiled": "explainer" if r.get("compiled") else "no", "value": r["trainer_vs_bare"],
                           "target": AIMS["trainer_vs_bare"]})
        elif "error" in r:
            checks.append({"aim": "trainer_vs_bare", "classifier": r["classifier"], "batch_size": r["batch_size"],
                           "error": r["error"][-500:], "target": AIMS["trainer_vs_bare"]})
    for c in checks:
        c["met"] = "value" in c and c["value"] >= c["target"]
    peak_mem = {f"{r['classifier']}/bs{r['batch_size']}/{r['mode']}/{r.get('compiled', 'no')}": r["peak_mem_gib"]
                for r in step_rows if "peak_mem_gib" in r}
    return {
        "device": (eager or compiled or e2e or {}).get("device"),
        "env": env,
        "aims": AIMS,
        "checks": checks,
        "all_met": bool(checks) and all(c["met"] for c in checks) and not missing and not partial
        and bool(resume and resume.get("ok")),
        "missing": missing,
        "partial": partial,  # stopped by the time budget: the rows measured before that
        "peak_mem_gib": peak_mem,
        "trainer_peak_mem_gib": {f"{r['classifier']}/bs{r['batch_size']}": r.get("trainer_peak_mem_gib")
                                 for r in (e2e or {}).get("e2e", [])},
        "eval_timing": (timing or {}).get("results"),
        # issue 16: the ours step at many classes against 20 (time and peak memory ratios, same run)
        "class_ratios": (_load(folder / "step_classes.json") or {}).get("class_ratios"),
        # issue 26: a checkpoint saved and resumed by the trainer on this device
        "checkpoint_resume": _load(folder / "checkpoint_resume.json"),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    folder = Path(argv[0])
    summary = summarise(folder)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from explainer.atomic import write_json_atomic

    write_json_atomic(folder / "summary.json", summary)
    print(f"device: {summary['device']}")
    for c in summary["checks"]:
        value = f"{c['value']:.3f}" if "value" in c else f"error: {c.get('error', '')[:80]}"
        print(f"  {'ok  ' if c['met'] else 'MISS'} {c['aim']:<16} {c['classifier']:<10} bs {c['batch_size']:>3} "
              f"compiled={c.get('compiled', '-'):<20} {value} (aim >= {c['target']})")
    resume = summary["checkpoint_resume"]
    if resume is not None:
        print(f"  {'ok  ' if resume.get('ok') else 'MISS'} checkpoint_resume: saved {resume.get('saved')}, resumed "
              f"from step {resume.get('resumed_from_step')}, {resume.get('final_steps')} steps"
              f"{'' if resume.get('ok') else ': ' + str(resume.get('error', ''))[:200]}")
    for name in summary["partial"]:
        print(f"  PART {name}: stopped by the time budget; the rows above are those measured before")
    for name in summary["missing"]:
        print(f"  MISS {name}: not written (stage failed or ran out of the time budget; see the log)")
    print(f"wrote {folder / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
