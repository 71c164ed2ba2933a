"""Oracle k: post hoc, from the predictions a `top_k` grid saved, how few experts each example really needed.

Per group of rows that differ only in `top_k` (scalar values) and per example: the oracle k is the smallest k
whose prediction equals the prediction at the group's largest k. An oracle policy answering every example at its
oracle k reproduces the largest k's answers, hence its score, at the mean oracle k experts per token -- the
headroom an adaptive per-example routing could claim. Also reported: the fixed-k scores, and the "best" oracle
(smallest k reaching the example's best score over the grid), an upper bound on what any per-example k could score.
"""

import json
import statistics
from collections import Counter
from pathlib import Path


def _predictions(out: Path, row: dict) -> dict[tuple[str, str], dict]:
    """(task, example id) -> {"prediction", "score" (the task's primary metric)} of one setting."""
    preds = {}
    for task, primary in row["primary"].items():
        path = out / "settings" / row["id"] / task / "predictions.jsonl"
        for line in path.read_text().splitlines():
            p = json.loads(line)
            preds[(task, p["id"])] = {"prediction": p["prediction"], "score": p["score"].get(primary)}
    return preds


def oracle_k(out: Path, rows: list[dict]) -> list[dict]:
    """One report per group of rows that vary only in a scalar top_k (groups with < 2 k values are skipped)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        k = row["setting"].get("top_k")
        if isinstance(k, int):
            rest = {key: v for key, v in row["setting"].items() if key != "top_k"}
            groups.setdefault(json.dumps(rest, sort_keys=True), []).append(row)
    return [_group_report(out, json.loads(key), sorted(members, key=lambda r: r["setting"]["top_k"]))
            for key, members in groups.items() if len(members) >= 2]


def _group_report(out: Path, rest: dict, members: list[dict]) -> dict:
    ks = [r["setting"]["top_k"] for r in members]
    preds = [_predictions(out, r) for r in members]
    examples = sorted(set.intersection(*(set(p) for p in preds)))
    oracle, best, oracle_scores, best_scores = [], [], [], []
    for ex in examples:
        at = [p[ex] for p in preds]
        k_idx = next(i for i, a in enumerate(at) if a["prediction"] == at[-1]["prediction"])
        oracle.append(ks[k_idx])
        oracle_scores.append(at[k_idx]["score"] or 0.0)
        top = max(a["score"] or 0.0 for a in at)
        b_idx = next(i for i, a in enumerate(at) if (a["score"] or 0.0) == top)
        best.append(ks[b_idx])
        best_scores.append(top)
    n = len(examples)
    fixed = {str(k): statistics.mean(p[ex]["score"] or 0.0 for ex in examples) if n else None
             for k, p in zip(ks, preds, strict=True)}
    return {
        "setting": rest, "top_k": ks, "examples": n,
        "oracle_k_distribution": {str(k): c for k, c in sorted(Counter(oracle).items())},
        "mean_oracle_k": statistics.mean(oracle) if n else None,
        "oracle_score": statistics.mean(oracle_scores) if n else None,
        "fixed_k_score": fixed,
        "best_oracle_mean_k": statistics.mean(best) if n else None,
        "best_oracle_score": statistics.mean(best_scores) if n else None,
    }


def format_report(report: dict) -> str:
    dist = ", ".join(f"k={k}: {c}" for k, c in report["oracle_k_distribution"].items())
    fixed = ", ".join(f"k={k}: {100 * s:.1f}" for k, s in report["fixed_k_score"].items() if s is not None)
    where = " ".join(f"{k}={v}" for k, v in report["setting"].items()) or "defaults"
    return (f"oracle k over top_k={report['top_k']} ({where}; {report['examples']} examples)\n"
            f"  distribution: {dist}\n"
            f"  mean oracle k {report['mean_oracle_k']:.2f} -> score {100 * report['oracle_score']:.1f} "
            f"(fixed k: {fixed})\n"
            f"  best-answer oracle: mean k {report['best_oracle_mean_k']:.2f} -> score "
            f"{100 * report['best_oracle_score']:.1f}")
