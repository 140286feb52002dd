"""Hyper-parameter sweeps: the sweep file, its expansion into runs, the sweep.json index, and the report.

A sweep file (configs/sweeps/*.yaml) names a base config, fixed overrides and a grid or a seeded random search over
dotted config keys. `launch/submit.py --sweep FILE` turns it into one run per point, each with its own output folder
and W&B group/tags, submitted as ONE job array; `launch/sweep_report.py SWEEP_DIR` reads the index back and ranks the
runs by their best validation metrics, keeping failed and unfinished runs in the table.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from explainer.atomic import write_text_atomic
from explainer.config import ConfigError, ExplainerRunConfig, load_config, parse_overrides, read_yaml_mapping

SWEEP_KEYS = {"name", "base_config", "method", "num_samples", "seed", "overrides", "parameters", "metric", "maximize"}
DISTRIBUTIONS = ("uniform", "log_uniform")
INDEX = "sweep.json"


@dataclass
class ParamSpec:
    """Either a list of values (grid axis, or a uniform choice in random search) or a continuous distribution."""

    values: list[Any] | None = None
    distribution: str | None = None
    low: float | None = None
    high: float | None = None

    def sample(self, rng: random.Random) -> Any:
        if self.values is not None:
            return rng.choice(self.values)
        assert self.low is not None and self.high is not None
        if self.distribution == "log_uniform":
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return float(f"{value:.4g}")  # readable tags and folder listings; 4 digits is finer than any lambda matters


@dataclass
class SweepSpec:
    path: Path
    name: str
    base_config: Path
    method: str = "grid"
    num_samples: int | None = None
    seed: int = 0
    overrides: list[str] = field(default_factory=list)
    parameters: dict[str, ParamSpec] = field(default_factory=dict)
    metric: str = "loss"  # how sweep_report ranks runs; val loss is not comparable across different loss weights
    maximize: bool = False


def _param(path: Path, key: str, raw: Any, method: str) -> ParamSpec:
    where = f"{path}: parameters.{key}"
    if isinstance(raw, list):
        raw = {"values": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a list of values, {{values: [...]}} or "
                          f"{{distribution: uniform|log_uniform, min: .., max: ..}}, got {raw!r}")
    if "values" in raw:
        if set(raw) != {"values"}:
            raise ConfigError(f"{where}: 'values' cannot be combined with {sorted(set(raw) - {'values'})}")
        values = raw["values"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.values: expected a non-empty list, got {values!r}")
        return ParamSpec(values=values)
    if set(raw) != {"distribution", "min", "max"}:
        raise ConfigError(f"{where}: a distribution needs exactly the keys distribution, min, max; got {sorted(raw)}")
    if method == "grid":
        raise ConfigError(f"{where}: a grid needs explicit values; distributions are for method: random")
    dist, low, high = raw["distribution"], raw["min"], raw["max"]
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{where}.distribution: {dist!r} is not one of {', '.join(DISTRIBUTIONS)}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
        raise ConfigError(f"{where}: min and max must be numbers with min < max, got {low!r}, {high!r}")
    if dist == "log_uniform" and low <= 0:
        raise ConfigError(f"{where}: log_uniform needs min > 0, got {low!r}")
    return ParamSpec(distribution=dist, low=float(low), high=float(high))


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file; paths inside it are relative to the file."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep file")
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}'; valid keys: {', '.join(sorted(SWEEP_KEYS))}")
    for key in ("name", "base_config", "parameters"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key '{key}'")
    name = raw["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"{path}: name must be letters, digits, '_', '.', '-' (it names folders and W&B groups), "
                          f"got {name!r}")
    method = raw.get("method", "grid")
    if method not in ("grid", "random"):
        raise ConfigError(f"{path}: method must be 'grid' or 'random', got {method!r}")
    num_samples = raw.get("num_samples")
    if method == "random" and (not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1):
        raise ConfigError(f"{path}: method random needs num_samples >= 1, got {num_samples!r}")
    if method == "grid" and num_samples is not None:
        raise ConfigError(f"{path}: num_samples is for method random (a grid runs every combination)")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{path}: seed must be an integer, got {seed!r}")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{path}: overrides must be a list of 'key.sub=value' strings, got {overrides!r}")
    params_raw = raw["parameters"]
    if not isinstance(params_raw, dict) or not params_raw:
        raise ConfigError(f"{path}: parameters must be a non-empty mapping of dotted config keys")
    parameters = {str(key): _param(path, str(key), value, method) for key, value in params_raw.items()}
    metric, maximize = raw.get("metric", "loss"), raw.get("maximize", False)
    if not isinstance(metric, str) or not isinstance(maximize, bool):
        raise ConfigError(f"{path}: metric must be a validation metric name and maximize true/false, "
                          f"got {metric!r}, {maximize!r}")
    base = raw["base_config"]
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base_config must be a path (relative to the sweep file), got {base!r}")
    return SweepSpec(path=path, name=name, base_config=(path.parent / base).resolve(), method=method,
                     num_samples=num_samples, seed=seed, overrides=list(overrides), parameters=parameters,
                     metric=metric, maximize=maximize)


def expand(spec: SweepSpec) -> list[dict[str, Any]]:
    """The sweep's points, in a stable order: grid in declaration order (last key fastest), or seeded samples."""
    keys = list(spec.parameters)
    if spec.method == "grid":
        axes = [spec.parameters[k].values for k in keys]
        return [dict(zip(keys, combo)) for combo in itertools.product(*axes)]
    rng = random.Random(spec.seed)
    assert spec.num_samples is not None
    return [{k: spec.parameters[k].sample(rng) for k in keys} for _ in range(spec.num_samples)]


def yaml_scalar(value: Any) -> str:
    """Format a value so that load_config's YAML parsing gives it back (1e-05 would come back as a string)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def point_overrides(point: dict[str, Any]) -> list[str]:
    return [f"{key}={yaml_scalar(value)}" for key, value in point.items()]


def _flat_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys |= _flat_keys(value, dotted + ".") if isinstance(value, dict) else {dotted}
    return keys


@dataclass
class SweepRun:
    index: int
    params: dict[str, Any]
    overrides: list[str]
    cfg: ExplainerRunConfig


def make_sweep_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_runs(spec: SweepSpec, sweep_dir: Path, sweep_id: str, cli_overrides: list[str],
               base_config: Path | None = None) -> list[SweepRun]:
    """Validate every point into a full config (strict errors name the run and key) before anything is submitted."""
    clash = sorted(_flat_keys(parse_overrides(cli_overrides)) & set(spec.parameters))
    if clash:
        raise ConfigError(f"override {clash[0]} is swept by {spec.path}; remove it from the command line")
    base = base_config or spec.base_config
    runs = []
    for index, point in enumerate(expand(spec)):
        extra = point_overrides(point)
        try:
            cfg = load_config(ExplainerRunConfig, base, [*spec.overrides, *cli_overrides, *extra])
        except ConfigError as exc:
            raise ConfigError(f"sweep {spec.path}, run {index} ({', '.join(extra)}): {exc}") from None
        cfg = copy.deepcopy(cfg)
        tag = f"{index:03d}"
        cfg.train.output_dir = str(sweep_dir / "runs" / tag)
        cfg.tracking.group = sweep_id
        cfg.tracking.run_name = f"{sweep_id}/{tag}"
        cfg.tracking.run_id = f"{sweep_id}-{tag}"
        cfg.tracking.tags = list(dict.fromkeys([*cfg.tracking.tags, "sweep", spec.name,
                                                *(f"{k.split('.')[-1]}={v}" for k, v in point.items())]))
        runs.append(SweepRun(index=index, params=point, overrides=extra, cfg=cfg))
    return runs


# ----------------------------------------------------------------------------------------------------------------------
# The index and the report
# ----------------------------------------------------------------------------------------------------------------------


def write_index(sweep_dir: Path, payload: dict[str, Any]) -> Path:
    from explainer.atomic import write_json_atomic

    path = sweep_dir / INDEX
    write_json_atomic(path, payload)
    return path


def read_index(sweep_dir: str | Path) -> dict[str, Any]:
    path = Path(sweep_dir) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {sweep_dir} a folder made by `launch/submit.py --sweep`?")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(index, dict) or not isinstance(index.get("runs"), list):
        raise ValueError(f"{path}: expected an object with a 'runs' list")
    return index


_FAILURE = re.compile(r"triggered an exception|CANCELLED AT|DUE TO TIME LIMIT|oom-kill|srun: error|Traceback")
_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+(?:Error|Exception)|[\w.]*Diverged)\b.*")


def _failure(log_paths: list[str | None]) -> str | None:
    """The reason a run failed, from its submitit/SLURM logs; None if the logs show no failure."""
    for log in log_paths:
        if not log or not Path(log).is_file():
            continue
        text = Path(log).read_text(errors="replace")
        if not _FAILURE.search(text):
            continue
        errors = [m.group(0).strip() for line in text.splitlines() if (m := _ERROR_LINE.match(line))]
        if errors:
            return errors[-1][:200]
        return next(line.strip() for line in reversed(text.splitlines()) if _FAILURE.search(line))[:200]
    return None


def _val_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if record.get("kind") == "val":
            out.append(record)
    return out


def run_row(run: dict[str, Any]) -> dict[str, Any]:
    """One report row: status, parameters, and the validation at the run's best checkpoint (lowest val loss of the
    run, i.e. the exported explainer.pt), or at its best validation so far for an unfinished run."""
    run_dir = Path(run["output_dir"])
    row: dict[str, Any] = {"index": run["index"], "job_id": run.get("job_id"), **run.get("params", {})}
    best: dict[str, Any] | None = None
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        status = "finished (early stop)" if summary.get("stopped_early") else "finished"
        best = summary.get("best")
        row["steps"] = f"{summary.get('steps')}/{summary.get('total_steps')}"
    else:
        history = _val_history(run_dir)
        failed = _failure([run.get("stderr"), run.get("stdout")])
        status = f"failed: {failed}" if failed else ("unfinished" if history or run_dir.is_dir() else "not started")
        scored = [h for h in history if isinstance(h.get("loss"), (int, float)) and not math.isnan(h["loss"])]
        if scored:
            best = min(scored, key=lambda h: h["loss"])
    row["status"] = status
    if best:
        row["best_step"] = best.get("step")
        for key, value in best.items():
            if key not in ("step", "epoch", "improved", "kind") and isinstance(value, (int, float)):
                row[f"val_{key}"] = value
    row["output_dir"] = str(run_dir)
    return row


def report_rows(index: dict[str, Any], metric: str = "loss", maximize: bool = False) -> list[dict[str, Any]]:
    """All runs, best first by val_<metric>; runs without that metric (failed, not started) last, by index."""
    rows = [run_row(run) for run in index["runs"]]
    key = f"val_{metric}"

    def has(row: dict[str, Any]) -> bool:
        return isinstance(row.get(key), (int, float)) and not math.isnan(row[key])

    scored = sorted((r for r in rows if has(r)), key=lambda r: r[key], reverse=maximize)
    rest = sorted((r for r in rows if not has(r)), key=lambda r: r["index"])
    for rank, row in enumerate(scored, 1):
        row["rank"] = rank
    return scored + rest


def _columns(rows: list[dict[str, Any]], params: list[str], metric: str) -> list[str]:
    head = ["rank", "index", "status", *params, "best_step"]
    first = [f"val_{metric}", "val_loss"]
    metrics = sorted({k for r in rows for k in r if k.startswith("val_")},
                     key=lambda k: (first.index(k) if k in first else len(first), k))
    tail = ["steps", "job_id", "output_dir"]
    return [c for c in head + metrics + tail if any(c in r for r in rows) or c in ("rank", "status")]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def to_markdown(rows: list[dict[str, Any]], params: list[str], metric: str = "loss") -> str:
    cols = _columns(rows, params, metric)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]], params: list[str], metric: str = "loss") -> str:
    cols = _columns(rows, params, metric)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in cols})
    return buffer.getvalue()


def _unranked_note(rows: list[dict[str, Any]], metric: str) -> str:
    """Why nothing is ranked when no run logged the metric (e.g. mask_iou without validation segmentations)."""
    if any("rank" in row for row in rows):
        return ""
    logged = sorted({k.removeprefix("val_") for r in rows for k in r if k.startswith("val_")})
    if not logged:
        return f"No run logged a validation metric yet, so none is ranked by val_{metric}.\n\n"
    return (f"**No run logged val_{metric}** (e.g. mask_iou needs validation images with segmentations), so none is "
            f"ranked: rank by one the runs logged with `--metric {logged[0]}` (logged: {', '.join(logged)}).\n\n")


def write_report(sweep_dir: str | Path, metric: str | None = None, maximize: bool | None = None
                 ) -> tuple[str, Path, Path]:
    """Markdown table (returned, and SWEEP_DIR/report.md) and SWEEP_DIR/report.csv, written atomically.
    metric/maximize default to the sweep file's (stored in sweep.json)."""
    sweep_dir = Path(sweep_dir)
    index = read_index(sweep_dir)
    metric = metric or index.get("metric", "loss")
    maximize = bool(index.get("maximize", False)) if maximize is None else maximize
    rows = report_rows(index, metric, maximize)
    params = list(index.get("parameters") or dict.fromkeys(k for r in index["runs"] for k in r.get("params", {})))
    counts: dict[str, int] = {}
    for row in rows:
        state = row["status"].split(":")[0].split(" (")[0]
        counts[state] = counts.get(state, 0) + 1
    title = (f"# Sweep {index.get('sweep_id', sweep_dir.name)}\n\n{len(rows)} runs: "
             + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
             + f". Each run at its best checkpoint (lowest val loss of that run); ranked by val_{metric} "
             f"({'higher' if maximize else 'lower'} is better).\n\n")
    markdown = title + _unranked_note(rows, metric) + to_markdown(rows, params, metric)
    paths = []
    for name, text in (("report.md", markdown), ("report.csv", to_csv(rows, params, metric))):
        paths.append(write_text_atomic(sweep_dir / name, text))
    return markdown, paths[0], paths[1]
