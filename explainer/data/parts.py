"""A shard run cut into N parts (one per machine or SLURM array task) and the parts merged into one manifest.

Every part plans the whole data set exactly as a one-process run would (same listing, same seeded hold-out and
shuffle), then keeps its contiguous slice of each split: part I of N holds tasks [I*L/N, (I+1)*L/N). The assignment
depends only on the plan, never on which machine finishes first, and the slices in part order are the one-process
order. Each part is an ordinary shard folder (its own manifest, `--resume` works on it alone) that records a digest of
the whole plan; `merge` checks that the parts share it (same source, classes, seed, options and N, each part present
once) and writes one manifest listing every part's shards where they lie, copying nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from explainer.atomic import write_text_atomic
from explainer.data.shards import MANIFEST_NAME

# what must be equal in every part of one run (besides the plan digest, which covers the task lists)
SAME = ("dataset", "classes", "seed", "source", "shard_limits")


def plan_digest(splits: dict[str, Sequence[Any]]) -> str:
    """A digest of the whole plan: split names and every task (paths, labels, keys) in order."""
    h = hashlib.sha1()
    for split, tasks in splits.items():
        h.update(f"{split}:{len(tasks)}\n".encode())
        for task in tasks:
            h.update(repr(task).encode())
    return h.hexdigest()


def part_slice(tasks: Sequence[Any], num_parts: int, part: int) -> list[Any]:
    n = len(tasks)
    return list(tasks[n * part // num_parts: n * (part + 1) // num_parts])


def select_part(splits: dict[str, list[Any]], num_parts: int,
                part: int) -> tuple[dict[str, list[Any]], dict[str, Any] | None]:
    """(this part's tasks per split, the `parts` entry of its manifest); a one-part run is returned as is."""
    if num_parts < 1:
        raise ValueError(f"--num-parts must be 1 or more, got {num_parts}")
    if not 0 <= part < num_parts:
        raise ValueError(f"--part must be in 0..{num_parts - 1} (--num-parts {num_parts}), got {part}")
    if num_parts == 1:
        return splits, None
    info = {"num_parts": num_parts, "part": part, "plan": plan_digest(splits),
            "plan_totals": {split: len(tasks) for split, tasks in splits.items()}}
    return {split: part_slice(tasks, num_parts, part) for split, tasks in splits.items()}, info


def _read_part(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"part {folder} has no {MANIFEST_NAME}: that part has not finished (rerun its "
                                "command with --resume)") from None
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON ({exc})") from None
    if "parts" not in manifest:
        raise ValueError(f"{path} is not a part: it was written without --num-parts")
    return manifest


def check_parts(folders: Sequence[Path], manifests: Sequence[dict[str, Any]]) -> list[int]:
    """The part folders in part order, after checking they are one run's parts, each present once."""
    first, where = manifests[0], folders[0]
    for folder, m in zip(folders, manifests):
        for key in SAME:
            if m.get(key) != first.get(key):
                raise ValueError(f"parts {where} and {folder} differ in {key!r}: they are not parts of one run")
        for key in ("num_parts", "plan"):
            if m["parts"][key] != first["parts"][key]:
                what = "the plan (source files, labels or options)" if key == "plan" else key
                raise ValueError(f"parts {where} and {folder} differ in {what}: they are not parts of one run")
    num = first["parts"]["num_parts"]
    seen: dict[int, Path] = {}
    for folder, m in zip(folders, manifests):
        i = m["parts"]["part"]
        if i in seen:
            raise ValueError(f"part {i} of {num} given twice: {seen[i]} and {folder}")
        seen[i] = folder
    missing = sorted(set(range(num)) - set(seen))
    if missing:
        raise ValueError(f"parts {', '.join(map(str, missing))} of {num} are missing (give every part folder once)")
    return sorted(range(len(folders)), key=lambda j: manifests[j]["parts"]["part"])


def _place(folder: Path, out: Path, part: int, names: list[str]) -> str:
    """The path prefix of a part's shards relative to `out`: the part folder itself when it lies inside `out`, else
    hard links in out/parts/<part> (same file system: no bytes copied)."""
    rel = os.path.relpath(folder.resolve(), out.resolve())
    if not rel.startswith(".."):
        return "" if rel == "." else rel + "/"
    target = out / "parts" / f"{part:05d}"
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        src, dst = folder / name, target / name
        if dst.exists() and os.path.samefile(src, dst):
            continue
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError as exc:
            raise ValueError(f"cannot link {src} into {target} ({exc.strerror}): put the part folders under --out "
                             f"(e.g. --out {out}/part-{part}) or on the file system of {out}") from None
    return f"parts/{part:05d}/"


def merge_parts(folders: Sequence[str | os.PathLike], out: str | os.PathLike,
                command: Sequence[str] | None = None) -> dict[str, Any]:
    """One manifest in `out` over the shards of every part; returns it."""
    if not folders:
        raise ValueError("merge: give the part folders")
    paths = [Path(f) for f in folders]
    out = Path(out)
    manifests = [_read_part(p) for p in paths]
    order = check_parts(paths, manifests)
    out.mkdir(parents=True, exist_ok=True)
    merged = {k: copy.deepcopy(v) for k, v in manifests[order[0]].items()
              if k not in ("parts", "splits", "skipped", "warnings")}
    merged.update(splits={}, skipped=[], warnings=[], command=shlex.join(command if command is not None else sys.argv))
    for j in order:
        m, folder = manifests[j], paths[j]
        names = [e["path"] for info in m["splits"].values() for e in info["shards"]]
        for name in names:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"part {folder}: shard {name} listed in its manifest does not exist")
        prefix = _place(folder, out, m["parts"]["part"], names)
        for split, info in m["splits"].items():
            dst = merged["splits"].setdefault(split, {"shards": [], "total": 0, "unlabelled": 0})
            dst["shards"] += [{**e, "path": prefix + e["path"]} for e in info["shards"]]
            dst["total"] += info["total"]
            dst["unlabelled"] += info["unlabelled"]
        merged["skipped"] += m["skipped"]
        merged["warnings"] += m["warnings"]
    _sum_counts(merged, [manifests[j] for j in order])
    first = manifests[order[0]]["parts"]
    merged["parts"] = {"num_parts": first["num_parts"], "plan": first["plan"],
                       "merged_from": [str(paths[j]) for j in order],
                       "part_commands": [manifests[j]["command"] for j in order]}
    write_text_atomic(out / MANIFEST_NAME, json.dumps(merged, indent=1) + "\n")
    return merged


def _sum_counts(merged: dict[str, Any], manifests: Sequence[dict[str, Any]]) -> None:
    """A source's per-part counters (e.g. imagenet.counts) add up."""
    for key, value in merged.items():
        if isinstance(value, dict) and isinstance(value.get("counts"), dict):
            value["counts"] = {c: sum(m[key]["counts"].get(c, 0) for m in manifests) for c in value["counts"]}
