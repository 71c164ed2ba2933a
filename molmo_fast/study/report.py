"""What a study shows: the table (sorted by latency, front marked), study.png and TensorBoard HParams."""

import shutil
from pathlib import Path

from molmo_fast.study.pareto import pareto_mask, row_experts, row_latency, row_score


def table(rows: list[dict]) -> str:
    """One line per setting, fastest first; '*' marks the score-vs-latency front."""
    head = (f"{'':1} {'setting':<40}{'score':>8}{'ms/example':>12}{'decode ms/tok':>14}{'prefill ms':>11}"
            f"{'experts/tok':>12}{'GFLOP/ex':>10}")
    lines = [head]
    for r in sorted(rows, key=lambda r: (row_latency(r) is None, row_latency(r) or 0.0)):
        lat = r["latency_ms"]
        score = "-" if r["score"] is None else f"{100 * r['score']:.1f}"
        decode = "-" if lat["decode_per_token"] is None else f"{lat['decode_per_token']:.2f}"
        lines.append(f"{'*' if r['pareto'] else ' ':1} {r['label'][:39]:<40}{score:>8}{lat['per_example']:>12.2f}"
                     f"{decode:>14}{lat['prefill']:>11.2f}{row_experts(r):>12.2f}{r['gflops_per_example']:>10.4f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Score vs latency per example and score vs active experts per token, each with its front, points labelled."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["score"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, cost, xlabel in ((axes[0], row_latency, "latency per example (ms)"),
                             (axes[1], row_experts, "active experts per token (all kinds)")):
        on_front = [r for r, m in zip(rows, pareto_mask(rows, row_score, cost), strict=True) if m]
        ax.scatter([cost(r) for r in rows], [100 * r["score"] for r in rows], color="tab:blue", zorder=2)
        front = sorted(on_front, key=cost)
        ax.step([cost(r) for r in front], [100 * r["score"] for r in front], where="post", color="tab:red",
                label="Pareto front", zorder=1)
        for r in rows:
            ax.annotate(r["label"], (cost(r), 100 * r["score"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("score (mean primary metric, %)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle("runtime knob study")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tensorboard(rows: list[dict], tb_dir: Path) -> None:
    """One HParams session per setting (knob values as hparams; score, latencies, experts, GFLOPs as metrics).
    Rewritten from the rows every time, so a resumed study does not duplicate sessions."""
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(tb_dir, ignore_errors=True)
    keys = sorted({k for r in rows for k in r["setting"]})
    # one type per hparam (TensorBoard infers its domain): numbers only where every setting has a number
    numeric = {k for k in keys if all(isinstance(r["setting"].get(k), (int, float)) for r in rows)}
    with SummaryWriter(str(tb_dir)) as writer:
        for r in rows:
            hparams = {k: r["setting"][k] if k in numeric else _text(r["setting"].get(k)) for k in keys}
            metrics = {"study/score": r["score"] if r["score"] is not None else float("nan"),
                       **{f"study/latency_ms/{k}": v for k, v in r["latency_ms"].items() if v is not None},
                       **{f"study/active_experts/{k}": v for k, v in r["active_experts_per_token"].items()},
                       "study/gflops_per_example": r["gflops_per_example"], "study/pareto": float(r["pareto"])}
            writer.add_hparams(hparams, metrics, run_name=r["id"])


def _text(value) -> str:
    return "default" if value is None else "none" if value == "" else str(value)
