"""Academic VQA / chart / document / MC converters, with the public HF datasets' real column names.

Styles follow Molmo (`vqa2`, `text_vqa`, `chart_qa`, `doc_qa`, `info_qa`, `a_okvqa_mc`, `science_qa`, ...) so the
formatter's style prefixes match what MolmoE-1B was fine-tuned with. TallyQA, TabMWP, FigureQA, PlotQA and DVQA
are read from their HuggingFaceM4/the_cauldron configs (images + user/assistant `texts`), the one public HF copy of
all five with a common schema. Datasets whose hub repo is a loading script (refused by datasets >= 4) are read
from parquet copies with the same columns (lmms-lab's VQAv2 and textvqa), or need --input (OK-VQA).
"""

from __future__ import annotations

import re

from molmo_fast.data.formatter import MC_LETTERS
from molmo_fast.data.sources.hf import HFSource, as_list

MMMU_SUBJECTS = (
    "Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory", "Basic_Medical_Science",
    "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science", "Design", "Diagnostics_and_Laboratory_Medicine",
    "Economics", "Electronics", "Energy_and_Power", "Finance", "Geography", "History", "Literature", "Manage",
    "Marketing", "Materials", "Math", "Mechanical_Engineering", "Music", "Pharmacy", "Physics", "Psychology",
    "Public_Health", "Sociology",
)


def _answers(values) -> list[str]:
    """Answer lists come as strings or as VQA-style dicts with an 'answer' key."""
    return [str(a["answer"] if isinstance(a, dict) else a) for a in as_list(values)]


def short_qa(style: str, question: str = "question", answers: str = "answers", ids: tuple[str, ...] = ()):
    def convert(row, size):
        meta = {k: row[k] for k in ids if row.get(k) is not None}
        return [{"style": style, "question": row[question], "answers": _answers(row[answers]), "metadata": meta}]
    return convert


def vqa2(row, size):
    # testdev / test rows carry no answers (scored by the VQA server)
    answers = _answers(row.get("answers")) or ([row["multiple_choice_answer"]] if row.get("multiple_choice_answer")
                                                else [])
    return [{"style": "vqa2", "question": row["question"], "answers": answers,
             "metadata": {"question_id": row["question_id"], "image_id": row["image_id"]}}]


def ok_vqa(row, size):
    """Molmo scores OK-VQA against each answer's `raw_answer`, not the stemmed `answer` of the same record."""
    answers = as_list(row["answers"])
    if answers and not isinstance(answers[0], dict):
        raise ValueError("ok_vqa reads answers[*].raw_answer (the HuggingFaceM4/OK-VQA layout); these answers are "
                         "plain strings (e.g. lmms-lab/OK-VQA), which would score a different answer set")
    return [{"style": "okvqa", "question": row["question"], "answers": [str(a["raw_answer"]) for a in answers],
             "metadata": {"question_id": row["question_id"], "image_id": row.get("image_id")}}]


def chart_qa(row, size):
    human = row.get("human_or_machine") in (0, "human")
    return [{"style": "chart_qa", "question": row["query"], "answers": _answers(row["label"]),
             "metadata": {"is_human": human}}]


def a_okvqa(row, size):
    return [{"style": "a_okvqa_mc", "question": row["question"], "options": as_list(row["choices"]),
             "answer_idx": int(row["correct_choice_idx"]),
             "metadata": {"question_id": row["question_id"], "direct_answers": _answers(row["direct_answers"])}}]


def science_qa(row, size):
    if row.get("image") is None:
        return []  # ScienceQA-img = the questions that have an image
    hint = (row.get("hint") or "").strip()
    question = f"{hint}\n{row['question']}" if hint else row["question"]
    return [{"style": "science_qa", "question": question, "options": as_list(row["choices"]),
             "answer_idx": int(row["answer"]), "metadata": {"subject": row.get("subject")}}]


def count_bench(row, size):
    return [{"style": "point_count", "question": row["question"], "answers": [str(row["number"])],
             "metadata": {"count": int(row["number"]), "text": row.get("text")}}]


def real_world_qa(row, size):
    return [{"style": "real_world_qa", "question": row["question"], "answers": [str(row["answer"])],
             "metadata": {}}]


_IMAGE_OPTION = re.compile(r"<img='(.*?)'>")


def mmmu(row, size):
    """Every question, as Molmo builds them: the model sees `image_1` (the one image it takes); a question whose
    options are images is asked without one. A multiple-choice answer of several letters keeps them all."""
    n_images = sum(row.get(f"image_{i}") is not None for i in range(1, 8))
    question = row["question"].replace("<image 1>", "the image") if n_images == 1 else row["question"]
    options = [str(o) for o in as_list(row.get("options"))]
    answer = str(row["answer"]).strip()
    meta = {"id": row["id"], "question_type": row.get("question_type"), "answer": answer, "images": n_images}
    example = {"style": "mmmu", "metadata": meta}
    if sum(_IMAGE_OPTION.match(o) is not None for o in options) > 1:
        example["text_only"] = True
    if row.get("question_type") != "multiple-choice" or not options:
        return [{**example, "question": question, "answers": [answer]}]
    letters = [str(x).strip() for x in as_list(answer)] if answer else []
    if not letters or not all(len(x) == 1 and 0 <= MC_LETTERS.find(x) < len(options) for x in letters):
        return []  # no option letter to score against: the build counts it as skipped
    if len(letters) == 1:
        return [{**example, "question": question, "options": options, "answer_idx": MC_LETTERS.index(letters[0])}]
    # several correct letters: the shard's MC fields hold one index, so the options go into the question text
    # (laid out as the formatter lays out `options`) and the scorer accepts any of the letters
    listed = "\n".join(f"{MC_LETTERS[i]}: {o}" for i, o in enumerate(options))
    meta["options"] = options
    return [{**example, "question": f"{question}\n{listed}\n", "answers": letters}]


def ai2d(row, size):
    """lmms-lab's AI2D test copies (question, options, answer) carry no box flags: `ai2d` reads the no-mask images
    (option letters drawn over diagram text that stays visible, the closest public match to Molmo's transparent
    boxes), `ai2d_masked` the images whose labelled text is covered (Molmo's opaque boxes). Molmo's own AI2D build
    (answer_texts, correct_answer, abc_label, has_transparent_box, question_id; read with --input) has the flags,
    and the eval task uses them when present."""
    if "answer_texts" in row:
        options, idx = row["answer_texts"], int(row["correct_answer"])
    else:
        options, idx = row["options"], int(row["answer"])
    meta = {k: bool(row[k]) for k in ("abc_label", "has_transparent_box") if row.get(k) is not None}
    if row.get("question_id") is not None:
        meta["question_id"] = str(row["question_id"])
    return [{"style": "ai2_diagram", "question": row["question"], "options": [str(o) for o in as_list(options)],
             "answer_idx": idx, "metadata": meta}]


def math_vista(row, size):
    """Multiple-choice rows become options + answer_idx on the bare question (the formatter lays the options out;
    the `query` column repeats them in its own layout); free-form rows keep `query`, whose hint names the format."""
    answer = str(row.get("answer") or "")
    meta = {"pid": row["pid"], "question_type": row.get("question_type"), "answer_type": row.get("answer_type"),
            "unit": row.get("unit"), "precision": row.get("precision"), "answer": answer}
    choices = [str(c) for c in as_list(row.get("choices"))]
    if row.get("question_type") == "multi_choice":
        if answer not in choices:
            return []  # counted as skipped by the build; no such row in testmini
        return [{"style": "math_vista", "question": row["question"], "options": choices,
                 "answer_idx": choices.index(answer), "metadata": meta}]
    return [{"style": "math_vista", "question": row.get("query") or row["question"], "answers": [answer],
             "metadata": meta}]


def cauldron(style: str):
    """the_cauldron rows: `texts` = [{user, assistant, source}, ...] on one image -> one multi-turn conversation."""
    def convert(row, size):
        messages = []
        for turn in as_list(row["texts"]):
            messages += [turn["user"], turn["assistant"]]
        return [{"style": style, "messages": messages, "metadata": {}}]
    return convert


def _cauldron(name, config, style):
    return HFSource(name, "HuggingFaceM4/the_cauldron", cauldron(style), configs=(config,), image_column="images",
                    description=f"{config} from the_cauldron")


OK_VQA_INPUT = ("HuggingFaceM4/OK-VQA is a loading script, which datasets >= 4 refuses, and no parquet copy keeps "
                "raw_answer; export it once with datasets < 4 (load_dataset('HuggingFaceM4/OK-VQA', "
                "trust_remote_code=True).save_to_disk(DIR)) and pass DIR")
A_OKVQA_TEST = ("A-OKVQA hides its test answers (correct_choice_idx and direct_answers are null): nothing to train on "
                "or score; use validation")


SOURCES = [
    HFSource("vqa_v2", "lmms-lab/VQAv2", vqa2, splits=("validation", "testdev", "test"), default_split="validation",
             description="VQAv2 (COCO 2014); parquet copy of HuggingFaceM4/VQAv2 with the same columns"),
    HFSource("text_vqa", "lmms-lab/textvqa", short_qa("text_vqa", ids=("question_id", "image_id")),
             splits=("train", "validation", "test"), default_split="validation",
             description="parquet copy of facebook/textvqa with the same columns"),
    HFSource("doc_vqa", "HuggingFaceM4/DocumentVQA", short_qa("doc_qa", ids=("questionId",)),
             splits=("train", "validation", "test"), default_split="validation"),
    HFSource("info_vqa", "lmms-lab/DocVQA", short_qa("info_qa", ids=("questionId",)), configs=("InfographicVQA",),
             splits=("validation", "test"), default_split="validation"),
    HFSource("chart_qa", "HuggingFaceM4/ChartQA", chart_qa, splits=("train", "val", "test"), default_split="test"),
    HFSource("ai2d", "lmms-lab/ai2d-no-mask", ai2d, splits=("test",), default_split="test",
             description="AI2D test, letters over visible text (Molmo's transparent-box setting, approximately)"),
    HFSource("ai2d_masked", "lmms-lab/ai2d", ai2d, splits=("test",), default_split="test",
             description="AI2D test, labelled text masked by the letters (Molmo's opaque-box setting)"),
    HFSource("a_okvqa", "HuggingFaceM4/A-OKVQA", a_okvqa, splits=("train", "validation", "test"),
             default_split="validation", refused=(("test", A_OKVQA_TEST),)),
    HFSource("ok_vqa", "HuggingFaceM4/OK-VQA", ok_vqa, splits=("train", "validation"), default_split="validation",
             needs_input=OK_VQA_INPUT),
    HFSource("science_qa_img", "derek-thomas/ScienceQA", science_qa, splits=("train", "validation", "test"),
             default_split="validation"),
    HFSource("count_bench_qa", "vikhyatk/CountBenchQA", count_bench, splits=("test",), default_split="test"),
    HFSource("real_world_qa", "xai-org/RealworldQA", real_world_qa, splits=("test",), default_split="test"),
    HFSource("mmmu", "MMMU/MMMU", mmmu, splits=("dev", "validation", "test"), default_split="validation",
             configs=MMMU_SUBJECTS, image_column="image_1"),
    HFSource("math_vista", "AI4Math/MathVista", math_vista, splits=("testmini", "test"), default_split="testmini",
             image_column="decoded_image"),
    _cauldron("tally_qa", "tallyqa", "tally_qa"),
    _cauldron("tabmwp", "tabmwp", "tabwmp_da"),
    _cauldron("figure_qa", "figureqa", "figure_qa"),
    _cauldron("plot_qa", "plotqa", "plot_qa"),
    _cauldron("dv_qa", "dvqa", "dv_qa"),
]
