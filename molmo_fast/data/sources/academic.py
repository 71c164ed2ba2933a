"""Academic VQA / chart / document / MC converters, with the public HF datasets' real column names.

Styles follow Molmo (`vqa2`, `text_vqa`, `chart_qa`, `doc_qa`, `info_qa`, `a_okvqa_mc`, `science_qa`, ...) so the
formatter's style prefixes match what MolmoE-1B was fine-tuned with. TallyQA, TabMWP, FigureQA, PlotQA and DVQA
are read from their HuggingFaceM4/the_cauldron configs (images + user/assistant `texts`), the one public HF copy of
all five with a common schema.
"""

from __future__ import annotations

import re

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
    answers = _answers(row["answers"]) or [row["multiple_choice_answer"]]
    return [{"style": "vqa2", "question": row["question"], "answers": answers,
             "metadata": {"question_id": row["question_id"], "image_id": row["image_id"]}}]


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


def mmmu(row, size):
    if row.get("image_1") is None or any(row.get(f"image_{i}") is not None for i in range(2, 8)):
        return []  # single-image questions only; the model sees one image per example
    question = re.sub(r"<image 1>", "the image", row["question"])
    meta = {"id": row["id"], "question_type": row.get("question_type"), "answer": row["answer"]}
    options = as_list(row.get("options"))
    if row.get("question_type") == "multiple-choice" and options:
        letter = row["answer"].strip()
        idx = "ABCDEFGHIJ".find(letter) if len(letter) == 1 else -1
        if not 0 <= idx < len(options):
            return []  # no single option letter (e.g. several answers): the build counts it as skipped
        return [{"style": "mmmu", "question": question, "options": [str(o) for o in options], "answer_idx": idx,
                 "metadata": meta}]
    return [{"style": "mmmu", "question": question, "answers": [str(row["answer"])], "metadata": meta}]


def ai2d(row, size):
    """lmms-lab/ai2d (question, options, answer) carries no box flags, so on it the transparent-box setting cannot be
    told apart from the plain one. Molmo's own AI2D build (answer_texts, correct_answer, abc_label,
    has_transparent_box, question_id; read with --input) has them, and the eval task uses them when present."""
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


SOURCES = [
    HFSource("vqa_v2", "HuggingFaceM4/VQAv2", vqa2, default_split="validation", description="VQAv2 (COCO 2014)"),
    HFSource("text_vqa", "facebook/textvqa", short_qa("text_vqa", ids=("question_id", "image_id")),
             default_split="validation"),
    HFSource("doc_vqa", "HuggingFaceM4/DocumentVQA", short_qa("doc_qa", ids=("questionId",)),
             default_split="validation"),
    HFSource("info_vqa", "lmms-lab/DocVQA", short_qa("info_qa", ids=("questionId",)), configs=("InfographicVQA",),
             default_split="validation"),
    HFSource("chart_qa", "HuggingFaceM4/ChartQA", chart_qa, default_split="test"),
    HFSource("ai2d", "lmms-lab/ai2d", ai2d, default_split="test"),
    HFSource("a_okvqa", "HuggingFaceM4/A-OKVQA", a_okvqa, default_split="validation"),
    HFSource("ok_vqa", "HuggingFaceM4/OK-VQA", short_qa("okvqa", ids=("question_id",)), default_split="validation"),
    HFSource("science_qa_img", "derek-thomas/ScienceQA", science_qa, default_split="validation"),
    HFSource("count_bench_qa", "vikhyatk/CountBenchQA", count_bench, default_split="test"),
    HFSource("real_world_qa", "xai-org/RealworldQA", real_world_qa, default_split="test"),
    HFSource("mmmu", "MMMU/MMMU", mmmu, default_split="validation", configs=MMMU_SUBJECTS, image_column="image_1"),
    HFSource("math_vista", "AI4Math/MathVista", math_vista, default_split="testmini", image_column="decoded_image"),
    _cauldron("tally_qa", "tallyqa", "tally_qa"),
    _cauldron("tabmwp", "tabmwp", "tabwmp_da"),
    _cauldron("figure_qa", "figureqa", "figure_qa"),
    _cauldron("plot_qa", "plotqa", "plot_qa"),
    _cauldron("dv_qa", "dvqa", "dv_qa"),
]
