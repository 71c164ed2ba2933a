import numpy as np
import pytest

from molmo_fast.data.formatter import format_example, points_to_text
from molmo_fast.data.sources.academic import ai2d, chart_qa, count_bench, math_vista
from molmo_fast.data.sources.pixmo import pixmo_points_eval
from molmo_fast.eval.tasks import (
    BY_QUESTION_TYPE,
    HIGH_RES_MAX_CROPS,
    PAPER_TASKS,
    SYNTHETIC_TASKS,
    TASKS,
    Task,
    get_task,
    parse_tasks,
)


def test_paper_suite_matches_the_published_average():
    assert len(PAPER_TASKS) == 11
    scores = [TASKS[name].paper_score for name in PAPER_TASKS]
    assert round(sum(scores) / len(scores), 1) == 68.6  # MolmoE-1B's published 11-benchmark average


def test_generation_lengths_and_resolution_follow_molmo():
    assert get_task("chart_qa").max_new_tokens == 12 and get_task("chart_qa").high_res
    assert get_task("chart_qa").max_crops == HIGH_RES_MAX_CROPS and get_task("chart_qa").sequence_length == 4096
    for name in ("countbench_qa", "pixmo_count"):
        task = get_task(name)
        assert task.max_new_tokens == 192 and not task.high_res
        assert task.max_crops is None and task.sequence_length == 1536  # low-res = the checkpoint's crops
    assert get_task("pixmo_points_eval").max_new_tokens == 192
    assert all(get_task(n).synthetic_size > 0 and not get_task(n).high_res for n in SYNTHETIC_TASKS)


def test_parse_tasks():
    assert [t.name for t in parse_tasks("chart_qa, doc_qa,chart_qa")] == ["chart_qa", "doc_qa"]
    assert [t.name for t in parse_tasks("synthetic")] == SYNTHETIC_TASKS
    assert [t.name for t in parse_tasks(["paper"])] == PAPER_TASKS
    with pytest.raises(KeyError, match="unknown eval task 'chartqa'"):
        parse_tasks("chartqa")


def test_task_validation_names_the_field():
    with pytest.raises(ValueError, match="task 'x': metric 'bleu'"):
        Task("x", "src", "test", "bleu", "bleu", None)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Task("x", "src", "test", "vqa", "vqa_score", None, max_new_tokens=0)


def test_prompt_styles():
    rwqa = get_task("real_world_qa")
    assert rwqa.style == BY_QUESTION_TYPE
    mc = {"style": "real_world_qa", "question": "Which?\nA. x\nB. y\nPlease answer directly with only the letter "
          "of the correct option and nothing else.", "answers": ["B"]}
    short = {"style": "real_world_qa", "question": "How many? Please answer directly with a single word or number.",
             "answers": ["3"]}
    assert rwqa.prompt_example(mc)["style"] == "eval_multiple_choice"
    assert rwqa.prompt_example(short)["style"] == "eval_short_answer"
    assert "vqa2:" in format_example(rwqa.prompt_example(short), for_inference=True)[0][-1]
    chart = get_task("chart_qa").prompt_example({"style": "other", "question": "q", "answers": ["1"]})
    assert format_example(chart, for_inference=True)[0][-1].startswith(" User: chart_qa:")


def test_real_world_qa_scoring():
    task = get_task("real_world_qa")
    mc = {"question": "Pick. Please answer directly with only the letter of the correct option", "answers": ["B"]}
    assert task.score("B", mc)["real_world_qa_score"] == 1.0
    assert task.score("A", mc)["real_world_qa_score"] == 0.0
    assert task.score("The Two", {"question": "How many?", "answers": ["2"]})["real_world_qa_score"] == 1.0


def test_chart_qa_reports_human_and_augmented_halves():
    task = get_task("chart_qa")
    human = chart_qa({"query": "q", "label": ["10"], "human_or_machine": 0}, (10, 10))[0]
    machine = chart_qa({"query": "q", "label": ["10"], "human_or_machine": 1}, (10, 10))[0]
    assert task.score("10.2", human) == {"relaxed_correctness": 1.0, "em": 0.0, "relaxed_correctness_human": 1.0,
                                         "relaxed_correctness_aug": None}
    assert task.score("20", machine)["relaxed_correctness_aug"] == 0.0


def test_count_scoring_on_countbench_examples():
    ex = count_bench({"question": "How many cats?", "number": 4, "text": "t"}, (10, 10))[0]
    task = get_task("countbench_qa")
    assert task.score("Counting the cats shows a total of 4.", ex) == {"correct": 1.0, "close": 1.0, "valid": 1.0}
    assert task.score("5", ex) == {"correct": 0.0, "close": 1.0, "valid": 1.0}
    assert task.score("many", ex) == {"correct": 0.0, "close": 0.0, "valid": 0.0}


def test_pointing_eval_unpacks_shard_masks():
    width, height = 40, 20
    masks = np.zeros((2, height, width), dtype=bool)
    masks[0, :, :20] = True
    masks[1, :, 20:] = True
    row = {"points": [{"x": 25.0, "y": 50.0}, {"x": 75.0, "y": 50.0}], "label": "dot", "image_url": "u",
           "masks": masks.tolist()}
    ex = pixmo_points_eval(row, (width, height))[0]
    ex["image_size"] = [width, height]
    task = get_task("pixmo_points_eval")
    inside = points_to_text([[12, 10], [28, 10]], "dot", [width, height])
    assert task.score(inside, ex)["f1"] == 1.0
    # The second point is nearest to the second ground truth but outside its mask (x < 20).
    edge = points_to_text([[12, 10], [19, 10]], "dot", [width, height])
    assert task.score(edge, ex) == {"precision": 0.5, "recall": 0.5, "f1": 0.5}


def _ai2d_row(abc_label, transparent):
    return {"question": "Which?", "answer_texts": ["leaf", "root"], "correct_answer": 1, "abc_label": abc_label,
            "has_transparent_box": transparent, "question_id": "4185.png-0"}


def test_ai2d_transparent_box_setting_from_the_box_flags():
    task = get_task("ai2d")
    assert task.primary == "mc_ai2d_transparent"
    scores = {flags: task.score("B", ai2d(_ai2d_row(*flags), (10, 10))[0])
              for flags in [(True, True), (True, False), (False, False)]}
    assert scores[(True, True)] == {"mc_ai2d_transparent": 1.0, "mc_ai2d_opaque": None, "mc": 1.0}
    assert scores[(True, False)] == {"mc_ai2d_transparent": None, "mc_ai2d_opaque": 1.0, "mc": 1.0}
    assert scores[(False, False)] == {"mc_ai2d_transparent": 1.0, "mc_ai2d_opaque": 1.0, "mc": 1.0}
    # lmms-lab/ai2d has no flags: every question counts in both settings.
    plain = ai2d({"question": "Which?", "options": ["leaf", "root"], "answer": "0"}, (10, 10))[0]
    assert "abc_label" not in plain["metadata"]
    assert task.score("leaf", plain) == {"mc_ai2d_transparent": 1.0, "mc_ai2d_opaque": 1.0, "mc": 1.0}


def _math_vista_row(**kw):
    return {"pid": "7", "question": "Which fraction?", "query": "Hint: ...\nQuestion: Which fraction?\nChoices:\n"
            "(A) 3/11\n(B) 8/11", "choices": ["3/11", "8/11"], "answer": "8/11", "question_type": "multi_choice",
            "answer_type": "text", "unit": None, "precision": None, **kw}


def test_math_vista_choices_become_options_and_score():
    ex = math_vista(_math_vista_row(), (10, 10))[0]
    assert ex["options"] == ["3/11", "8/11"] and ex["answer_idx"] == 1 and ex["question"] == "Which fraction?"
    assert "choices" not in ex["metadata"] and "answers" not in ex
    task = get_task("math_vista")
    assert task.prompt_example(ex)["style"] == "eval_multiple_choice"
    prompt = format_example(task.prompt_example(ex), for_inference=True)[0][-1]
    assert "A: 3/11\nB: 8/11" in prompt and "(A)" not in prompt  # the formatter's layout, once
    for pred, score in [("B", 1.0), ("Answer: B", 1.0), ("(B)", 1.0), ("8/11", 1.0), ("A", 0.0)]:
        assert task.score(pred, ex) == {"math_vista_score": score}, pred
    free = math_vista(_math_vista_row(question_type="free_form", answer_type="float", choices=None, answer="1.5",
                                      precision=1.0), (10, 10))[0]
    assert "options" not in free and free["answers"] == ["1.5"] and free["question"].startswith("Hint:")
    assert task.prompt_example(free)["style"] == "eval_short_answer"
    assert task.score("so the value is 1.49", free) == {"math_vista_score": 1.0}
    assert math_vista(_math_vista_row(answer="9/11"), (10, 10)) == []  # answer outside its choices: skipped
    old_shard = {"id": "x", "question": "q", "answers": ["8/11"], "metadata": {"question_type": "multi_choice"}}
    with pytest.raises(ValueError, match="rebuild the math_vista shards"):
        task.score("B", old_shard)
