"""A benchmark task from its public dataset's columns to scores, offline: a tiny `datasets.Dataset` with the real
ChartQA / AI2D column names -> `python -m molmo_fast.data.build` -> `python -m molmo_fast.eval` (high-res)."""

import json

import datasets
import numpy as np
import pytest
from PIL import Image

from molmo_fast.data.build import main as build_main
from molmo_fast.eval.__main__ import main as eval_main


def _images(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (60 + 10 * i, 90, 3), dtype=np.uint8)) for i in range(n)]


ROWS = {
    "chart_qa": {"query": ["What is the max?", "Which year?", "How much?"], "label": [["12"], ["2019"], ["3.5"]],
                 "human_or_machine": [0, 1, 0]},
    "ai2d": {"question": ["Which is a leaf?", "What eats grass?", "Which part is the root?"],
             "options": [["A", "B", "C"], ["cow", "lion"], ["top", "middle", "bottom"]], "answer": ["1", "0", "2"]},
}


@pytest.mark.parametrize("task, source, primary, keys", [
    ("chart_qa", "chart_qa", "relaxed_correctness", {"relaxed_correctness_human", "relaxed_correctness_aug"}),
    ("ai2d", "ai2d", "mc_ai2d_transparent", {"mc"}),
])
def test_public_columns_to_scores(checkpoint, tmp_path, task, source, primary, keys):  # noqa: F811
    raw = tmp_path / "raw"
    columns = ROWS[source]
    datasets.Dataset.from_dict({**columns, "image": _images(len(next(iter(columns.values()))))}).save_to_disk(raw)
    data_dir = tmp_path / "data"
    assert build_main(["--source", source, "--split", "test", "--input", str(raw), "--workers", "1",
                       "--out", str(data_dir / source / "test")]) == 0
    result = eval_main(["--checkpoint", str(checkpoint), "--tasks", task, "--data_dir", str(data_dir),
                        "--max_new_tokens", "2", "--out", str(tmp_path / "out")])[0]
    assert result["n"] == 3 and result["primary"] == primary and 0.0 <= result["score"] <= 1.0
    assert keys <= set(result["metrics"])
    assert result["settings"]["max_crops"] == 36  # Molmo's high-res setting for the academic benchmarks
    rows = [json.loads(x) for x in (tmp_path / "out" / task / "predictions.jsonl").read_text().splitlines()]
    assert all(f" User: {task if task == 'chart_qa' else 'ai2_diagram'}:" in r["prompt"] for r in rows)
