"""Every hub-backed source against its dataset's real schema, read as the hub serves it: the columns and nested
feature types of the dataset card, written to parquet files laid out as the repo lays them out
(`data/{split}-00000-of-00001.parquet`, `{config}/{split}-...` for configs), split names as the card lists them,
then built through the offline `--input` path. A schema change on our side (a renamed column, a list read as a
struct) fails here. No network: the hub loader is replaced by one that refuses."""

import hashlib
import io
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import webdataset as wds
from datasets import Features, Image, List, Sequence, Value
from PIL import Image as PILImage

from molmo_fast.data import build
from molmo_fast.data.shards import decode_sample, read_sizes
from molmo_fast.data.sources.hf import load_rows, with_raw_images
from molmo_fast.data.sources.pixmo import tagged_turns
from molmo_fast.data.sources.registry import HF_SOURCES

W, H = 40, 20
_buf = io.BytesIO()
PILImage.fromarray(np.random.default_rng(1).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(_buf, "JPEG")
JPEG = _buf.getvalue()
SHA = hashlib.sha256(JPEG).hexdigest()
IMG = {"bytes": JPEG, "path": None}
S, I32, I64, F64, B = Value("string"), Value("int32"), Value("int64"), Value("float64"), Value("bool")
XY = {"x": F64, "y": F64}


def url(k):
    return f"http://images.example/{k}.jpg"


# source -> (hub splits from the card, features from the card, rows, check(decoded examples)).
# "list:" in a card is List(...) (rows of dicts); "sequence:" of a struct is Sequence(...) (a struct of lists).
CARDS = {
    "pixmo_cap": (("train",), Features({"image_url": S, "caption": S, "transcripts": List(S)}),
                  [{"image_url": url(0), "caption": "A dog.", "transcripts": ["a dog", "dog on grass"]}],
                  lambda ex: ex[0]["caption"] == "A dog." and ex[0]["metadata"]["transcripts"][1] == "dog on grass"),
    "pixmo_cap_qa": (
        ("train",), Features({"image_url": S, "question": S, "answer": S, "messages": List(S)}),
        [{"image_url": url(0), "question": "[USER] What is it? [ASSISTANT] A dog. [USER] Color? [ASSISTANT]",
          "answer": "Brown.", "messages": []},
         {"image_url": url(1), "question": "q", "answer": "a", "messages": ["q1", "a1", "q2", "a2"]}],
        lambda ex: ex[0]["messages"] == ["What is it?", "A dog.", "Color?", "Brown."]
        and ex[1]["messages"] == ["q1", "a1", "q2", "a2"]),
    "pixmo_ask_model_anything": (
        ("train",), Features({"image_url": S, "image_sha256": S, "question": S, "answer": S}),
        [{"image_url": url(0), "image_sha256": SHA, "question": "Why?", "answer": "Because."}],
        lambda ex: ex[0]["messages"] == ["Why?", "Because."]),
    "pixmo_points": (
        ("train",), Features({"image_url": S, "image_sha256": S, "points": List(XY), "count": I64, "label": S,
                              "collection_method": S}),
        [{"image_url": url(k), "image_sha256": SHA, "points": [{"x": 50.0, "y": 50.0}], "count": 1, "label": "cat",
          "collection_method": "pointing"} for k in range(3)],
        # url(1) is a pixmo-points-eval image (see _write): held out
        lambda ex: [e["metadata"]["image_url"] for e in ex] == [url(0), url(2)] and ex[0]["points"] == [[20.0, 10.0]]),
    "pixmo_point_explanations": (
        ("train",), Features({"image_url": S, "image_sha256": S, "question": S, "response": S, "parsed_response": S,
                              "alt_text": List(S), "inline_text": List(S), "points": List(List(XY))}),
        [{"image_url": url(0), "image_sha256": SHA, "question": "Where?", "response": "r",
          "parsed_response": "Here: <|POINT|>.", "alt_text": ["cup"], "inline_text": ["cup"],
          "points": [[{"x": 10.0, "y": 20.0}, {"x": 30.0, "y": 40.0}]]}],
        lambda ex: ex[0]["messages"][1].startswith("Here: <points ") and 'alt="cup">cup</points>.' in
        ex[0]["messages"][1]),
    "pixmo_count": (
        ("train", "validation", "test"),
        Features({"image_url": S, "image_sha256": S, "count": I64, "points": Sequence(XY), "label": S}),
        [{"image_url": url(0), "image_sha256": SHA, "count": 2, "points": {"x": [1.0, 2.0], "y": [3.0, 4.0]},
          "label": "cars"}],
        lambda ex: ex[0]["count"] == 2 and ex[0]["style"] == "point_count"),
    "pixmo_points_eval": (
        ("test",), Features({"image_url": S, "image_sha256": S, "points": List(XY), "masks": List(List(List(B))),
                             "label": S}),
        [{"image_url": url(1), "image_sha256": SHA, "points": [{"x": 25.0, "y": 50.0}],
          "masks": np.zeros((1, H, W), dtype=bool).tolist(), "label": "cat"}],
        lambda ex: ex[0]["points"] == [[10.0, 10.0]] and ex[0]["metadata"]["masks"]["shape"] == [1, H, W]),
    "pixmo_clocks": (
        ("train", "validation"),
        Features({"example_id": S, "watchface_id": S, "watchface_name": S, "watch_time": S, "time_format": S,
                  "shows_seconds": B, "hour_visible": I32, "minute_visible": I32, "second_visible": I32, "text": S,
                  "image": Image()}),  # the card's columns + the renders (--input)
        [{"example_id": "u8/005_galaxy", "watchface_id": "u8", "watchface_name": "galaxy",
          "watch_time": "005_2023-09-27T12:09:34", "time_format": "Without AM/PM", "shows_seconds": False,
          "hour_visible": 0, "minute_visible": 9, "second_visible": -1, "text": "12:09", "image": IMG}],
        lambda ex: ex[0]["answers"] == ["12:09"] and ex[0]["metadata"]["second_visible"] == -1),
    "pixmo_docs_charts": (
        ("train", "validation"),
        Features({"image": Image(), "image_id": S, "questions": Sequence({"question": S, "answer": S})}),
        [{"image": IMG, "image_id": "c1", "questions": {"question": ["q1", "q2"], "answer": ["a1", "a2"]}}],
        lambda ex: ex[0]["message_list"] == [["q1", "a1"], ["q2", "a2"]]),
    "vqa_v2": (
        ("validation", "testdev", "test"),
        Features({"question_type": S, "multiple_choice_answer": S,
                  "answers": List({"answer": S, "answer_confidence": S, "answer_id": I64}), "image_id": I64,
                  "answer_type": S, "question_id": I64, "question": S, "image": Image()}),
        [{"question_type": "what", "multiple_choice_answer": "red", "image_id": 9, "answer_type": "other",
          "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i} for i, a in enumerate("ab")],
          "question_id": 90, "question": "Which?", "image": IMG}],
        lambda ex: ex[0]["answers"] == ["a", "b"] and ex[0]["metadata"]["question_id"] == 90),
    "text_vqa": (
        ("train", "validation", "test"),
        Features({"image_id": S, "question_id": I32, "question": S, "question_tokens": List(S), "image": Image(),
                  "image_width": I32, "image_height": I32, "flickr_original_url": S, "flickr_300k_url": S,
                  "answers": List(S), "image_classes": List(S), "set_name": S, "ocr_tokens": List(S)}),
        [{"image_id": "x1", "question_id": 5, "question": "Brand?", "question_tokens": ["brand"], "image": IMG,
          "image_width": W, "image_height": H, "flickr_original_url": "o", "flickr_300k_url": "s",
          "answers": ["nike"] * 10, "image_classes": ["shoe"], "set_name": "val", "ocr_tokens": ["nike"]}],
        lambda ex: ex[0]["answers"] == ["nike"] * 10 and ex[0]["metadata"]["image_id"] == "x1"),
    "doc_vqa": (
        ("train", "validation", "test"),
        Features({"questionId": I64, "question": S, "question_types": List(S), "image": Image(), "docId": I64,
                  "ucsf_document_id": S, "ucsf_document_page_no": S, "answers": List(S)}),
        [{"questionId": 3, "question": "Date?", "question_types": ["form"], "image": IMG, "docId": 1,
          "ucsf_document_id": "u", "ucsf_document_page_no": "2", "answers": ["1999", "1999."]}],
        lambda ex: ex[0]["answers"] == ["1999", "1999."] and ex[0]["metadata"]["questionId"] == 3),
    "info_vqa": (
        ("validation", "test"),
        Features({"questionId": S, "question": S, "answers": List(S), "answer_type": List(S), "image": Image(),
                  "image_url": S, "operation/reasoning": List(S), "ocr": S, "data_split": S}),
        [{"questionId": "98", "question": "Share?", "answers": ["40%"], "answer_type": ["single span"], "image": IMG,
          "image_url": "u", "operation/reasoning": [], "ocr": "{}", "data_split": "val"}],
        lambda ex: ex[0]["answers"] == ["40%"] and ex[0]["style"] == "info_qa"),
    "chart_qa": (
        ("train", "val", "test"),
        Features({"image": Image(), "query": S, "label": List(S),
                  "human_or_machine": datasets.ClassLabel(names=["human", "machine"])}),
        [{"image": IMG, "query": "Max?", "label": ["12"], "human_or_machine": 1}],
        lambda ex: ex[0]["answers"] == ["12"] and ex[0]["metadata"]["is_human"] is False),
    "ai2d": (
        ("test",), Features({"question": S, "options": List(S), "answer": S, "image": Image()}),
        [{"question": "Which?", "options": ["leaf", "root", "stem"], "answer": "1", "image": IMG}],
        lambda ex: ex[0]["options"] == ["leaf", "root", "stem"] and ex[0]["answer_idx"] == 1),
    "a_okvqa": (
        ("train", "validation", "test"),
        Features({"image": Image(), "question_id": S, "question": S, "choices": List(S),
                  "correct_choice_idx": Value("int8"), "direct_answers": S, "difficult_direct_answer": B,
                  "rationales": List(S)}),
        [{"image": IMG, "question_id": "q1", "question": "Why?", "choices": ["a", "b", "c", "d"],
          "correct_choice_idx": 3, "direct_answers": "['d', 'd', 'c']", "difficult_direct_answer": False,
          "rationales": ["r"]}],
        lambda ex: ex[0]["answer_idx"] == 3 and ex[0]["metadata"]["direct_answers"] == ["d", "d", "c"]),
    "ok_vqa": (  # the HuggingFaceM4/OK-VQA loading script's features, as exported for --input
        ("train", "validation"),
        Features({"image": Image(), "question_type": S, "confidence": I32,
                  "answers": List({"answer": S, "raw_answer": S, "answer_confidence": S, "answer_id": I64}),
                  "image_id": I64, "answer_type": S, "question_id": I64, "question": S}),
        [{"image": IMG, "question_type": "other", "confidence": 3, "image_id": 1, "answer_type": "other",
          "answers": [{"answer": "race", "raw_answer": "racing", "answer_confidence": "yes", "answer_id": 1}],
          "question_id": 7, "question": "What sport?"}],
        lambda ex: ex[0]["answers"] == ["racing"]),
    "science_qa_img": (
        ("train", "validation", "test"),
        Features({"image": Image(), "question": S, "choices": List(S), "answer": Value("int8"), "hint": S,
                  "task": S, "grade": S, "subject": S, "topic": S, "category": S, "skill": S, "lecture": S,
                  "solution": S}),
        [{"image": IMG, "question": "Which?", "choices": ["x", "y"], "answer": 1, "hint": "", "task": "t",
          "grade": "g", "subject": "s", "topic": "t", "category": "c", "skill": "k", "lecture": "", "solution": ""},
         {"image": None, "question": "No image?", "choices": ["x", "y"], "answer": 0, "hint": "", "task": "t",
          "grade": "g", "subject": "s", "topic": "t", "category": "c", "skill": "k", "lecture": "", "solution": ""}],
        lambda ex: len(ex) == 1 and ex[0]["answer_idx"] == 1),
    "count_bench_qa": (
        ("test",), Features({"image": Image(), "text": S, "question": S, "number": I32}),
        [{"image": IMG, "text": "two dogs", "question": "How many dogs?", "number": 2}],
        lambda ex: ex[0]["metadata"]["count"] == 2),
    "real_world_qa": (
        ("test",), Features({"image": Image(), "question": S, "answer": S}),
        [{"image": IMG, "question": "Lane?", "answer": "B"}], lambda ex: ex[0]["answers"] == ["B"]),
    "mmmu": (
        ("dev", "validation", "test"),
        Features({"id": S, "question": S, "options": S, "explanation": S,
                  **{f"image_{i}": Image() for i in range(1, 8)}, "img_type": S, "answer": S,
                  "topic_difficulty": S, "question_type": S, "subfield": S}),
        [{"id": "validation_Art_1", "question": "<image 1> <image 2> which?", "options": "['a', 'b']",
          "explanation": "", **{f"image_{i}": IMG if i <= 2 else None for i in range(1, 8)},
          "img_type": "['Paintings']", "answer": "B", "topic_difficulty": "Easy",
          "question_type": "multiple-choice", "subfield": "Art"}],
        lambda ex: ex[0]["answer_idx"] == 1 and ex[0]["metadata"]["images"] == 2),
    "math_vista": (
        ("testmini", "test"),
        Features({"pid": S, "question": S, "image": S, "decoded_image": Image(), "choices": List(S), "unit": S,
                  "precision": F64, "answer": S, "question_type": S, "answer_type": S,
                  "metadata": {"category": S, "context": S, "grade": S, "img_height": I64, "img_width": I64,
                               "language": S, "skills": List(S), "source": S, "split": S, "task": S},
                  "query": S}),
        [{"pid": "1", "question": "Which?", "image": "images/1.jpg", "decoded_image": IMG, "choices": ["1", "2"],
          "unit": None, "precision": None, "answer": "2", "question_type": "multi_choice", "answer_type": "text",
          "metadata": {"category": "c", "context": "x", "grade": "g", "img_height": H, "img_width": W,
                       "language": "english", "skills": ["s"], "source": "x", "split": "testmini", "task": "t"},
          "query": "Hint: letter.\nWhich?"}],
        lambda ex: ex[0]["options"] == ["1", "2"] and ex[0]["answer_idx"] == 1),
    "tally_qa": (
        ("train",), Features({"images": List(Image()), "texts": List({"user": S, "assistant": S, "source": S})}),
        [{"images": [IMG], "texts": [{"user": "How many?", "assistant": "3", "source": "tallyqa"}]}],
        lambda ex: ex[0]["messages"] == ["How many?", "3"]),
}
CARDS["ai2d_masked"] = CARDS["ai2d"]
CARDS["pixmo_points_counting"] = CARDS["pixmo_points"][:3] + (
    lambda ex: [e["metadata"]["image_url"] for e in ex] == [url(0), url(2)] and ex[0]["style"] == "point_count",)
CARDS["pixmo_count_pointing"] = CARDS["pixmo_count"][:3] + (lambda ex: ex[0]["points"] == [[1.0, 3.0], [2.0, 4.0]],)
for _t in ("tables", "diagrams", "other"):
    CARDS[f"pixmo_docs_{_t}"] = CARDS["pixmo_docs_charts"]
for _n in ("tabmwp", "figure_qa", "plot_qa", "dv_qa"):
    CARDS[_n] = CARDS["tally_qa"]


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    real = datasets.load_dataset

    def local_only(path, *args, **kwargs):
        if path != "parquet":
            raise AssertionError(f"a test tried to load {path!r} from the hub")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", local_only)


def _write(name, root: Path) -> None:
    """The card's rows in every split file of the repo's layout (+ the pixmo-points-eval holdout beside them)."""
    source = HF_SOURCES[name]
    splits, features, rows, _ = CARDS[name]
    table = datasets.Dataset.from_list(rows, features=features)
    for config in source.configs:
        for split in splits:
            folder = root / (config or "data")
            folder.mkdir(parents=True, exist_ok=True)
            table.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    if source.holdout:
        held = root / source.holdout[0].rsplit("/", 1)[-1] / "data"
        held.mkdir(parents=True)
        _, eval_features, eval_rows, _ = CARDS["pixmo_points_eval"]
        datasets.Dataset.from_list(eval_rows, features=eval_features).to_parquet(str(held / "test-00000.parquet"))


def _read(out):
    return [decode_sample(s) for s in wds.tarfile_samples([{"url": u} for u in read_sizes(out)])]


def test_every_hf_source_has_a_card():
    assert set(CARDS) == set(HF_SOURCES)


@pytest.mark.parametrize("name", sorted(CARDS))
def test_source_reads_its_real_schema(name, tmp_path):
    source = HF_SOURCES[name]
    splits, features, _, check = CARDS[name]
    assert source.splits == splits  # the split names exactly as the card lists them
    _write(name, tmp_path / "hub")
    rows = load_rows(source, source.default_split, str(tmp_path / "hub"))
    assert set(features) <= set(rows.features)
    build.build_hf(source, tmp_path / "out", split=source.default_split, dataset=rows,
                   fetch=lambda u, timeout: JPEG, cache_dir=tmp_path / "cache", progress=False)
    examples = _read(tmp_path / "out")
    assert examples and check(examples), examples


def test_asking_for_a_split_the_hub_lacks_names_the_available_ones():
    for name, split, available in (("chart_qa", "validation", "train, val, test"), ("info_vqa", "train", None),
                                   ("ai2d", "train", "test"), ("tally_qa", "test", "train"),
                                   ("pixmo_docs_charts", "test", "train, validation")):
        with pytest.raises(ValueError, match=rf"has no split '{split}'; its splits are {available or '.*'}"):
            load_rows(HF_SOURCES[name], split)


def test_script_only_or_imageless_repos_need_input():
    for name in ("ok_vqa", "pixmo_clocks"):
        with pytest.raises(ValueError, match=rf"source '{name}' needs --input: "):
            load_rows(HF_SOURCES[name], HF_SOURCES[name].default_split)
    assert not any(re.search(r"HuggingFaceM4/(VQAv2|OK-VQA)|facebook/textvqa", s.hub_id) and not s.needs_input
                   for s in HF_SOURCES.values())


@pytest.mark.parametrize("name, split, reason", [
    ("pixmo_count_pointing", "test", "no points for its validation and test rows"),
    ("pixmo_count_pointing", "validation", "use pixmo_count"),
    ("a_okvqa", "test", "hides its test answers"),
])
def test_splits_the_converter_would_mislabel_are_refused(name, split, reason, tmp_path):
    _write(name, tmp_path / "hub")
    for call in (lambda: load_rows(HF_SOURCES[name], split, str(tmp_path / "hub")),
                 lambda: build.build_hf(HF_SOURCES[name], tmp_path / "out", split=split, progress=False,
                                        dataset=datasets.Dataset.from_list(CARDS[name][2], features=CARDS[name][1]),
                                        fetch=lambda u, timeout: JPEG, cache_dir=tmp_path / "cache")):
        with pytest.raises(ValueError, match=rf"refuses split '{split}': .*{reason}"):
            call()


def test_ok_vqa_refuses_answers_without_raw_answer(tmp_path):
    rows = [{"image": IMG, "question_id": "7", "question": "What sport?", "answers": ["race"],
             "question_type": "other", "answer_type": "other"}]  # lmms-lab/OK-VQA's layout
    ds = with_raw_images(datasets.Dataset.from_list(rows).cast_column("image", Image()))
    with pytest.raises(ValueError, match="raw_answer"):
        build.build_hf(HF_SOURCES["ok_vqa"], tmp_path / "out", split="validation", dataset=ds, progress=False)


def test_tagged_turns():
    assert tagged_turns("[USER] a [ASSISTANT] b [USER] c [ASSISTANT]", "d") == ["a", "b", "c", "d"]
    assert tagged_turns("[USER] a [ASSISTANT] b [USER] c", "d") == ["a", "b", "c", "d"]
    assert tagged_turns("plain question", "d") == ["plain question", "d"]
    for bad in ("[ASSISTANT] b", "preamble [USER] a", "[USER] a [ASSISTANT] b"):
        with pytest.raises(ValueError):
            tagged_turns(bad, "d")


def test_datasets_lower_bound_has_the_api_the_converters_use(tmp_path):
    """pyproject's `datasets` bound is the first release with `datasets.List` (the nested-image cast of
    with_raw_images); the installed release meets it and with_raw_images keeps nested image bytes undecoded."""
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    (bound,) = re.findall(r'^\s*"datasets>=([\d.]+)"', pyproject, flags=re.MULTILINE)
    assert int(bound.split(".")[0]) >= 4 and hasattr(datasets, "List")
    installed = tuple(int(x) for x in re.findall(r"\d+", datasets.__version__)[:2])
    assert installed >= tuple(int(x) for x in bound.split(".")[:2])
    ds = datasets.Dataset.from_list([{"images": [IMG, IMG], "image": IMG}],
                                    features=Features({"images": List(Image()), "image": Image()}))
    row = with_raw_images(ds)[0]
    assert row["images"][1]["bytes"] == JPEG and row["image"]["bytes"] == JPEG


def test_list_shows_repo_config_splits_and_input_needs(capsys):
    assert build.main(["--list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(HF_SOURCES) <= set(lines)
    assert re.search(r"HuggingFaceM4/ChartQA .*splits: train, val, test\* .*hub or --input", lines["chart_qa"])
    assert re.search(r"lmms-lab/DocVQA \[InfographicVQA\] .*splits: validation\*, test", lines["info_vqa"])
    assert "needs --input" in lines["ok_vqa"] and "needs --input" in lines["pixmo_clocks"]
    assert "refuses validation, test" in lines["pixmo_count_pointing"]
    assert "holds out allenai/pixmo-points-eval" in lines["pixmo_points"]
