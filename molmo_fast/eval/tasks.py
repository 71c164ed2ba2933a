"""The evaluation task registry: benchmark -> shard set, prompt style, generation length, metric, resolution.

A task reads the shard set `{data_dir}/{source}/{split}` written by `python -m molmo_fast.data.build`. Each
metric is a scorer `(raw_prediction, example) -> {name: score | None}`; None leaves the example out of that
average (e.g. AI2D's opaque-box questions under the transparent-box setting). The task's `primary` entry is the
number reported in the summary table and compared with `paper_score` (the MolmoE-1B score published in the Molmo paper).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from molmo_fast.eval import metrics as M

Scorer = Callable[[str, dict[str, Any]], dict[str, float | None]]

# Molmo's eval resolution: low-res = the checkpoint's own max_crops (12 for MolmoE-1B) with sequences of 1536;
# high-res = 36 crops with sequences of 4096.
HIGH_RES_MAX_CROPS = 36
HIGH_RES_SEQ_LEN = 4096
LOW_RES_SEQ_LEN = 1536


def _answers(example: dict) -> list[str]:
    answers = example.get("answers")
    if answers is None:
        answers = example.get("metadata", {}).get("answer", [])
    return [answers] if isinstance(answers, str) else list(answers)


def _vqa(pred: str, ex: dict) -> dict:
    return {"vqa_score": M.vqa_score(M.clean_prediction(pred), _answers(ex))}


def _relaxed(pred: str, ex: dict) -> dict:
    """ChartQA also reports its human-written and augmented halves when the shard marks them."""
    pred = M.clean_prediction(pred)
    score = M.relaxed_correctness(pred, _answers(ex))
    out = {"relaxed_correctness": score, "em": M.exact_match(pred, _answers(ex))}
    is_human = ex.get("metadata", {}).get("is_human")
    if is_human is not None:
        out.update(relaxed_correctness_human=score if is_human else None,
                   relaxed_correctness_aug=None if is_human else score)
    return out


def _anls(pred: str, ex: dict) -> dict:
    pred = M.clean_prediction(pred)
    return {"anls": M.anls(pred, _answers(ex)), "em": M.exact_match(pred, _answers(ex))}


def _mc(pred: str, ex: dict) -> dict:
    return {"mc": M.multiple_choice(M.clean_prediction(pred), ex["options"], ex["answer_idx"])}


def _mc_ai2d(pred: str, ex: dict) -> dict:
    """AI2D as in Molmo: a letter-labelled question counts in the transparent- or the opaque-box average, per how
    its diagram was drawn; the rest count in both. Without the flags (lmms-lab/ai2d) every question counts in both."""
    meta = ex.get("metadata", {})
    score = M.multiple_choice(M.clean_prediction(pred), ex["options"], ex["answer_idx"])
    abc, transparent = meta.get("abc_label", False), meta.get("has_transparent_box", False)
    return {"mc_ai2d_transparent": None if abc and not transparent else score,
            "mc_ai2d_opaque": None if abc and transparent else score, "mc": score}


_RWQA_MC_INSTRUCTION = "Please answer directly with only the letter of the correct option"


def _is_multiple_choice(ex: dict) -> bool:
    """RealWorldQA marks its multiple-choice questions only by their instruction line (as Molmo detects them)."""
    meta_type = ex.get("metadata", {}).get("question_type")
    return "options" in ex or meta_type in ("multiple_choice", "multi_choice", "multiple-choice") or (
        _RWQA_MC_INSTRUCTION in ex.get("question", ""))


def _real_world_qa(pred: str, ex: dict) -> dict:
    pred = M.clean_prediction(pred)
    answer = _answers(ex)[0]
    if "options" in ex:
        return {"real_world_qa_score": M.multiple_choice(pred, ex["options"], ex["answer_idx"])}
    if _is_multiple_choice(ex):
        letters = ["A", "B", "C", "D"]
        return {"real_world_qa_score": M.multiple_choice(pred, letters, letters.index(answer.strip().upper()))}
    return {"real_world_qa_score": float(M.normalize_vqa_answer(pred) == M.normalize_vqa_answer(answer))}


def _mmmu(pred: str, ex: dict) -> dict:
    meta = ex.get("metadata", {})
    options = ex.get("options", meta.get("options", []))
    answers = _answers(ex)
    if "answer_idx" in ex:
        answers = [chr(ord("A") + ex["answer_idx"])]
    question_type = meta.get("question_type", "multiple-choice" if options else "open")
    return {"mmmu_score": M.mmmu_score(M.clean_prediction(pred), answers, question_type, options)}


def _math_vista(pred: str, ex: dict) -> dict:
    meta = ex.get("metadata", {})
    if "options" in ex:
        choices, answer = ex["options"], ex["options"][ex["answer_idx"]]
    elif meta.get("question_type") == "multi_choice":
        raise ValueError(f"math_vista example {ex.get('id')}: a multiple-choice question without `options` (a shard "
                         f"built before the converter moved MathVista's choices there); rebuild the math_vista shards")
    else:
        choices, answer = [], _answers(ex)[0] if _answers(ex) else ""
    question_type = "multi_choice" if choices else meta.get("question_type") or "free_form"
    score = M.math_vista_score(pred.strip(), str(answer), question_type,
                               meta.get("answer_type") or "text", choices, meta.get("precision"))
    return {"math_vista_score": score}


def _true_count(ex: dict) -> int:
    count = ex.get("count")
    if count is None:  # CountBenchQA stores its number as the answer
        count = ex.get("metadata", {}).get("count", _answers(ex)[0])
    return int(count)


def _count(pred: str, ex: dict) -> dict:
    parsed, gold = M.parse_count(pred), _true_count(ex)
    return {"correct": float(parsed == gold), "close": float(parsed is not None and abs(parsed - gold) <= 1),
            "valid": float(parsed is not None)}


def _pointing(pred: str, ex: dict) -> dict:
    masks = ex.get("metadata", {}).get("masks")
    if isinstance(masks, dict):  # PixMo-Points-Eval shards pack the masks
        # imported here: the sources package pulls in `datasets`, which plain eval never needs
        from molmo_fast.data.sources.pixmo import unpack_masks

        masks = list(unpack_masks(masks))
    return M.pointing_scores(pred.strip(), ex["points"], ex["image_size"], masks=masks)


def _clock(pred: str, ex: dict) -> dict:
    answer = _answers(ex)[0]
    return {"exact": M.clock_accuracy(pred, answer), "close": M.clock_accuracy(pred, answer, tolerance_minutes=3)}


SCORERS: dict[str, Scorer] = {
    "vqa": _vqa, "relaxed_correctness": _relaxed, "anls": _anls, "mc": _mc,
    "mc_ai2d": _mc_ai2d, "real_world_qa": _real_world_qa, "mmmu": _mmmu, "math_vista": _math_vista,
    "count": _count, "pointing": _pointing, "clock": _clock,
}


# Task.style value for benchmarks that mix question kinds: Molmo's eval styles, chosen per example.
BY_QUESTION_TYPE = "eval_by_question_type"


@dataclass(frozen=True)
class Task:
    """One benchmark. `style` replaces each example's style at inference (None keeps the shard's;
    BY_QUESTION_TYPE picks eval_multiple_choice / eval_short_answer per example, as Molmo does)."""

    name: str
    source: str
    split: str
    metric: str
    primary: str
    style: str | None
    max_new_tokens: int = 12
    high_res: bool = True
    paper_score: float | None = None
    synthetic_size: int = 0  # > 0: the shard set is generated on demand with this many examples

    def __post_init__(self):
        if self.metric not in SCORERS:
            raise ValueError(f"task {self.name!r}: metric {self.metric!r} is not one of {sorted(SCORERS)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"task {self.name!r}: max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def max_crops(self) -> int | None:
        """Crops for this task; None = the checkpoint's own preprocessor setting (Molmo's low-res)."""
        return HIGH_RES_MAX_CROPS if self.high_res else None

    @property
    def sequence_length(self) -> int:
        return HIGH_RES_SEQ_LEN if self.high_res else LOW_RES_SEQ_LEN

    def score(self, prediction: str, example: dict[str, Any]) -> dict[str, float | None]:
        return SCORERS[self.metric](prediction, example)

    def prompt_example(self, example: dict[str, Any]) -> dict[str, Any]:
        """The example as the model should be prompted for this task."""
        if self.style is None:
            return example
        style = self.style
        if style == BY_QUESTION_TYPE:
            style = "eval_multiple_choice" if _is_multiple_choice(example) else "eval_short_answer"
        return {**example, "style": style}


_TASKS = [
    # The eleven benchmarks of the paper (published MolmoE-1B scores). VQAv2, DocVQA and InfoVQA
    # were published on test-server splits; locally they run on validation, so expect small differences.
    Task("ai2d", "ai2d", "test", "mc_ai2d", "mc_ai2d_transparent", "ai2_diagram", paper_score=86.4),
    Task("chart_qa", "chart_qa", "test", "relaxed_correctness", "relaxed_correctness", "chart_qa", paper_score=78.0),
    Task("vqa2", "vqa_v2", "validation", "vqa", "vqa_score", "vqa2", paper_score=83.9),
    Task("doc_qa", "doc_vqa", "validation", "anls", "anls", "doc_qa", paper_score=77.7),
    Task("info_qa", "info_vqa", "validation", "anls", "anls", "info_qa", paper_score=53.9),
    Task("text_vqa", "text_vqa", "validation", "vqa", "vqa_score", "text_vqa", paper_score=78.8),
    Task("real_world_qa", "real_world_qa", "test", "real_world_qa", "real_world_qa_score", BY_QUESTION_TYPE,
         paper_score=60.4),
    Task("mmmu", "mmmu", "validation", "mmmu", "mmmu_score", BY_QUESTION_TYPE, paper_score=34.9),
    Task("math_vista", "math_vista", "testmini", "math_vista", "math_vista_score", BY_QUESTION_TYPE,
         paper_score=34.0),
    Task("countbench_qa", "count_bench_qa", "test", "count", "correct", "point_count", max_new_tokens=192,
         high_res=False, paper_score=87.2),
    Task("pixmo_count", "pixmo_count", "test", "count", "correct", "point_count", max_new_tokens=192,
         high_res=False, paper_score=79.6),
    # Further academic and PixMo evaluations.
    Task("okvqa", "ok_vqa", "validation", "vqa", "vqa_score", "okvqa"),
    Task("a_okvqa_mc", "a_okvqa", "validation", "mc", "mc", "a_okvqa_mc"),
    Task("science_qa_img", "science_qa_img", "test", "mc", "mc", "science_qa"),
    Task("pixmo_points_eval", "pixmo_points_eval", "test", "pointing", "f1", "pointing", max_new_tokens=192),
    # Synthetic sets (no network): generated on first use; low-res so that a tiny demo model scores them.
    Task("synthetic_counting", "synthetic_counting", "validation", "count", "correct", "point_count",
         max_new_tokens=192, high_res=False, synthetic_size=256),
    Task("synthetic_pointing", "synthetic_pointing", "validation", "pointing", "f1", "pointing",
         max_new_tokens=192, high_res=False, synthetic_size=256),
    Task("synthetic_clocks", "synthetic_clocks", "validation", "clock", "exact", "clocks", high_res=False,
         synthetic_size=256),
    Task("synthetic_charts", "synthetic_charts", "validation", "relaxed_correctness", "relaxed_correctness",
         "chart_qa", high_res=False, synthetic_size=256),
]
TASKS: dict[str, Task] = {t.name: t for t in _TASKS}
PAPER_TASKS = [t.name for t in _TASKS if t.paper_score is not None]
SYNTHETIC_TASKS = [t.name for t in _TASKS if t.synthetic_size]


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown eval task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


def parse_tasks(spec: str | list[str]) -> list[Task]:
    """'chart_qa,doc_qa' (or a list; 'paper' and 'synthetic' name the suites) -> tasks, in order, no repeats."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    suites = {"paper": PAPER_TASKS, "synthetic": SYNTHETIC_TASKS}
    expanded = [n for name in names if name.strip() for n in suites.get(name.strip(), [name.strip()])]
    return [get_task(n) for n in dict.fromkeys(expanded)]
