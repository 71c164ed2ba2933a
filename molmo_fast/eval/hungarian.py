"""Minimum-cost bipartite assignment (the Hungarian method), for matching predicted to ground-truth points."""

import math
from collections.abc import Sequence


def hungarian(cost: Sequence[Sequence[float]]) -> list[tuple[int, int]]:
    """Minimum-cost assignment of a rectangular cost matrix (O(n^2 m) shortest augmenting paths).

    Returns (row, col) pairs, one per row when rows <= cols, else one per column.
    """
    n_rows = len(cost)
    n_cols = len(cost[0]) if n_rows else 0
    if n_rows == 0 or n_cols == 0:
        return []
    transposed = n_rows > n_cols
    if transposed:
        cost = [list(col) for col in zip(*cost)]
        n_rows, n_cols = n_cols, n_rows
    # Potentials u (rows) and v (cols), 1-based with a virtual column 0, as in the classic formulation.
    u, v = [0.0] * (n_rows + 1), [0.0] * (n_cols + 1)
    row_of_col, prev_col = [0] * (n_cols + 1), [0] * (n_cols + 1)
    for row in range(1, n_rows + 1):
        row_of_col[0] = row
        col = 0
        min_slack = [math.inf] * (n_cols + 1)
        used = [False] * (n_cols + 1)
        while row_of_col[col] != 0:
            used[col] = True
            r, delta, next_col = row_of_col[col], math.inf, 0
            for c in range(1, n_cols + 1):
                if not used[c]:
                    slack = cost[r - 1][c - 1] - u[r] - v[c]
                    if slack < min_slack[c]:
                        min_slack[c], prev_col[c] = slack, col
                    if min_slack[c] < delta:
                        delta, next_col = min_slack[c], c
            for c in range(n_cols + 1):
                if used[c]:
                    u[row_of_col[c]] += delta
                    v[c] -= delta
                else:
                    min_slack[c] -= delta
            col = next_col
        while col:
            row_of_col[col] = row_of_col[prev_col[col]]
            col = prev_col[col]
    pairs = [(row_of_col[c] - 1, c - 1) for c in range(1, n_cols + 1) if row_of_col[c]]
    return sorted((c, r) for r, c in pairs) if transposed else sorted(pairs)
