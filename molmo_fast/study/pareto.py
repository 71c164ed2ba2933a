"""Pareto fronts: the rows no other row beats on both a score (higher is better) and a cost (lower is better)."""

from collections.abc import Callable, Sequence


def pareto_mask(rows: Sequence[dict], score: Callable[[dict], float | None],
                cost: Callable[[dict], float | None]) -> list[bool]:
    """True for every row on the front. Row j beats row i when it is at least as good on both and strictly better on
    one; rows with a missing value are never on the front (and beat nobody)."""
    points = [(score(r), cost(r)) for r in rows]
    mask = []
    for i, (s_i, c_i) in enumerate(points):
        if s_i is None or c_i is None:
            mask.append(False)
            continue
        beaten = any(j != i and s_j is not None and c_j is not None and s_j >= s_i and c_j <= c_i
                     and (s_j > s_i or c_j < c_i) for j, (s_j, c_j) in enumerate(points))
        mask.append(not beaten)
    return mask


def row_score(row: dict) -> float | None:
    return row.get("score")


def row_latency(row: dict) -> float | None:
    return row.get("latency_ms", {}).get("per_example")


def row_experts(row: dict) -> float | None:
    return row.get("active_experts_per_token", {}).get("all")


def mark(rows: list[dict]) -> dict:
    """Set row["pareto"] (score vs latency per example); returns pareto.json's content: both fronts' setting ids,
    sorted by cost."""
    for row, on in zip(rows, pareto_mask(rows, row_score, row_latency), strict=True):
        row["pareto"] = on
    fronts = {}
    for name, cost in (("latency", row_latency), ("active_experts", row_experts)):
        front = [r for r, on in zip(rows, pareto_mask(rows, row_score, cost), strict=True) if on]
        fronts[name] = [{"id": r["id"], "setting": r["setting"], "score": r["score"], "cost": cost(r)}
                        for r in sorted(front, key=cost)]
    return {"score": "mean of the tasks' primary metrics (higher is better)",
            "costs": {"latency": "latency_ms.per_example", "active_experts": "active_experts_per_token.all"},
            "fronts": fronts}
