"""Every converter on a tiny `datasets.Dataset` with the real column names; downloads; the build CLI. No network:
URL images come from an injected fetch function or from a local HTTP server on 127.0.0.1."""

import hashlib
import http.server
import io
import json
import os
import threading

import datasets
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from molmo_fast.data import build
from molmo_fast.data.shards import decode_sample, read_info, read_sizes
from molmo_fast.data.sources.registry import HF_SOURCES, list_sources
from molmo_fast.data.sources.download import ImageFetcher, url_fetch
from molmo_fast.data.sources.pixmo import unpack_masks

W, H = 40, 20


def _jpeg(seed=0) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


JPEG = _jpeg()
SHA = hashlib.sha256(JPEG).hexdigest()
IMG = {"bytes": JPEG, "path": None}
URL = "http://images.example/a.jpg"


def _vqa_answers(*answers):
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


# source -> (rows with the dataset's real columns, check(list of decoded examples))
CASES = {
    "pixmo_cap": ([{"image_url": URL, "caption": "A long caption.", "transcripts": ["t1", "t2"]}],
                  lambda ex: ex[0]["caption"] == "A long caption." and ex[0]["metadata"]["transcripts"] == ["t1", "t2"]
                  and ex[0]["style"] == "long_caption"),
    "pixmo_cap_qa": ([{"image_url": URL, "question": "q", "answer": "a", "messages": ["q1", "a1", "q2", "a2"]}],
                     lambda ex: ex[0]["messages"] == ["q1", "a1", "q2", "a2"] and ex[0]["style"] == "synthetic_qa"),
    "pixmo_ask_model_anything": (
        [{"image_url": URL, "image_sha256": SHA, "question": "How many?", "answer": "Two."}],
        lambda ex: ex[0]["messages"] == ["How many?", "Two."] and ex[0]["style"] == "user_qa"),
    "pixmo_points": (
        [{"image_url": URL, "image_sha256": SHA, "points": [{"x": 50.0, "y": 25.0}], "count": 1, "label": "dog",
          "collection_method": "pointing"}],
        lambda ex: ex[0]["style"] == "pointing" and ex[0]["points"] == [[20.0, 5.0]] and ex[0]["label"] == "dog"),
    "pixmo_point_explanations": (
        [{"image_url": URL, "image_sha256": SHA, "question": "Where is the cat?", "response": "raw",
          "parsed_response": "There is <|POINT|> here.", "alt_text": ["cat"], "inline_text": ["a cat"],
          "points": [[{"x": 10.0, "y": 20.0}]]}],
        lambda ex: ex[0]["messages"][1] == 'There is <point x="10.0" y="20.0" alt="cat">a cat</point> here.'),
    "pixmo_count": (
        [{"image_url": URL, "image_sha256": SHA, "count": 2, "label": "cars",
          "points": {"x": [3.0, 30.0], "y": [4.0, 14.0]}}],
        lambda ex: ex[0]["points"] == [[3.0, 4.0], [30.0, 14.0]] and ex[0]["count"] == 2
        and ex[0]["style"] == "point_count"),
    "pixmo_points_eval": (
        [{"image_url": URL, "image_sha256": SHA, "label": "dog", "points": [{"x": 25.0, "y": 50.0}],
          "masks": np.eye(H, W, dtype=bool)[None].tolist()}],
        lambda ex: ex[0]["points"] == [[10.0, 10.0]]
        and (unpack_masks(ex[0]["metadata"]["masks"]) == np.eye(H, W, dtype=bool)[None]).all()),
    "pixmo_docs_charts": (
        [{"image": IMG, "image_id": "c1", "questions": [{"question": "q1", "answer": "a1"},
                                                        {"question": "q2", "answer": "a2"}]}],
        lambda ex: ex[0]["message_list"] == [["q1", "a1"], ["q2", "a2"]] and ex[0]["style"] == "pixmo_docs_charts"),
    "vqa_v2": (
        [{"image": IMG, "question": "What color?", "question_id": 7, "image_id": 3, "question_type": "what color",
          "answer_type": "other", "multiple_choice_answer": "red", "answers": _vqa_answers("red", "red", "blue")}],
        lambda ex: ex[0]["answers"] == ["red", "red", "blue"] and ex[0]["style"] == "vqa2"),
    "text_vqa": (
        [{"image": IMG, "question": "What brand?", "answers": ["nike", "nike"], "question_id": 1, "image_id": "x",
          "image_width": W, "image_height": H, "ocr_tokens": ["nike"], "set_name": "val"}],
        lambda ex: ex[0]["answers"] == ["nike", "nike"] and ex[0]["style"] == "text_vqa"),
    "doc_vqa": (
        [{"image": IMG, "questionId": 5, "question": "Date?", "answers": ["1999"], "question_types": ["form"],
          "docId": 2, "ucsf_document_id": "u", "ucsf_document_page_no": "1"}],
        lambda ex: ex[0]["answers"] == ["1999"] and ex[0]["style"] == "doc_qa"),
    "info_vqa": (
        [{"image": IMG, "questionId": 9, "question": "Percent?", "answers": ["40%"], "answer_type": ["span"],
          "image_url": "u", "operation/reasoning": None, "ocr": "", "data_split": "val"}],
        lambda ex: ex[0]["answers"] == ["40%"] and ex[0]["style"] == "info_qa"),
    "chart_qa": (
        [{"image": IMG, "query": "Max?", "label": ["12"], "human_or_machine": 0}],
        lambda ex: ex[0]["question"] == "Max?" and ex[0]["answers"] == ["12"] and ex[0]["metadata"]["is_human"]),
    "ai2d": (
        [{"image": IMG, "question": "Which?", "options": ["a", "b", "c"], "answer": "2"}],
        lambda ex: ex[0]["options"] == ["a", "b", "c"] and ex[0]["answer_idx"] == 2
        and "abc_label" not in ex[0]["metadata"]),
    "a_okvqa": (
        [{"image": IMG, "question_id": "q", "question": "Why?", "choices": ["x", "y"], "correct_choice_idx": 1,
          "direct_answers": "['y', 'y', 'z']", "difficult_direct_answer": False, "rationales": ["r"]}],
        lambda ex: ex[0]["answer_idx"] == 1 and ex[0]["metadata"]["direct_answers"] == ["y", "y", "z"]),
    "ok_vqa": (
        [{"image": IMG, "question": "Who?", "question_id": 4, "image_id": 1, "question_type": "other",
          "answer_type": "other", "confidence": 3,
          "answers": [{"answer": "cat", "raw_answer": "cats", "answer_confidence": "yes", "answer_id": 1}]}],
        lambda ex: ex[0]["answers"] == ["cat"] and ex[0]["style"] == "okvqa"),
    "science_qa_img": (
        [{"image": IMG, "question": "Which?", "choices": ["a", "b"], "answer": 0, "hint": "Look.", "task": "t",
          "grade": "g", "subject": "s", "topic": "t", "category": "c", "skill": "k", "lecture": "", "solution": ""},
         {"image": None, "question": "Text only?", "choices": ["a", "b"], "answer": 1, "hint": "", "task": "t",
          "grade": "g", "subject": "s", "topic": "t", "category": "c", "skill": "k", "lecture": "", "solution": ""}],
        lambda ex: len(ex) == 1 and ex[0]["question"] == "Look.\nWhich?" and ex[0]["answer_idx"] == 0),
    "count_bench_qa": (
        [{"image": IMG, "text": "three dogs", "question": "How many dogs?", "number": 3}],
        lambda ex: ex[0]["answers"] == ["3"] and ex[0]["metadata"]["count"] == 3),
    "real_world_qa": (
        [{"image": IMG, "question": "Which lane?\nA. left\nB. right", "answer": "B"}],
        lambda ex: ex[0]["answers"] == ["B"]),
    "mmmu": (
        [{"id": "validation_Art_1", "question": "In <image 1>, which?", "options": "['p', 'q', 'r']", "answer": "C",
          "explanation": "", "image_1": IMG, "image_2": None, "image_3": None, "image_4": None, "image_5": None,
          "image_6": None, "image_7": None, "img_type": "['Paintings']", "topic_difficulty": "Easy",
          "question_type": "multiple-choice", "subfield": "Art"},
         {"id": "validation_Art_2", "question": "Compare <image 1> and <image 2>.", "options": "[]", "answer": "x",
          "explanation": "", "image_1": IMG, "image_2": IMG, "image_3": None, "image_4": None, "image_5": None,
          "image_6": None, "image_7": None, "img_type": "[]", "topic_difficulty": "Hard",
          "question_type": "open", "subfield": "Art"}],
        lambda ex: len(ex) == 1 and ex[0]["options"] == ["p", "q", "r"] and ex[0]["answer_idx"] == 2
        and ex[0]["question"] == "In the image, which?"),
    "math_vista": (
        [{"pid": "1", "question": "Value?", "image": "images/1.jpg", "decoded_image": IMG, "choices": None,
          "unit": None, "precision": None, "answer": "5", "question_type": "free_form", "answer_type": "integer",
          "metadata": {"source": "x"}, "query": "Hint: answer.\nValue?"},
         {"pid": "2", "question": "Which?", "image": "images/2.jpg", "decoded_image": IMG, "choices": ["1/2", "3/4"],
          "unit": None, "precision": None, "answer": "3/4", "question_type": "multi_choice", "answer_type": "text",
          "metadata": {"source": "x"}, "query": "Hint: letter.\nWhich?\nChoices:\n(A) 1/2\n(B) 3/4"}],
        lambda ex: ex[0]["question"] == "Hint: answer.\nValue?" and ex[0]["answers"] == ["5"]
        and ex[1]["question"] == "Which?" and ex[1]["options"] == ["1/2", "3/4"] and ex[1]["answer_idx"] == 1),
}
for _name, _style in [("tally_qa", "tally_qa"), ("tabmwp", "tabwmp_da"), ("figure_qa", "figure_qa"),
                      ("plot_qa", "plot_qa"), ("dv_qa", "dv_qa")]:
    CASES[_name] = ([{"images": [IMG], "texts": [{"user": "Q1?", "assistant": "A1", "source": "s"},
                                                 {"user": "Q2?", "assistant": "A2", "source": "s"}]}],
                    lambda ex, s=_style: ex[0]["messages"] == ["Q1?", "A1", "Q2?", "A2"] and ex[0]["style"] == s)
# datasets returns a Sequence-of-struct feature as a struct of lists: the converters take both layouts
_STRUCT_OF_LISTS = [{"image": IMG, "image_id": "t1", "questions": {"question": ["q1", "q2"], "answer": ["a1", "a2"]}}]
for _t in ("tables", "diagrams", "other"):
    CASES[f"pixmo_docs_{_t}"] = (_STRUCT_OF_LISTS,
                                lambda ex, t=_t: ex[0]["style"] == f"pixmo_docs_{t}"
                                and len(ex[0]["message_list"]) == 2)

CASES["pixmo_points_counting"] = (CASES["pixmo_points"][0],
                                  lambda ex: ex[0]["style"] == "point_count" and ex[0]["points"] == [[20.0, 5.0]]
                                  and ex[0]["count"] == 1)
CASES["pixmo_count_pointing"] = (CASES["pixmo_count"][0],
                                 lambda ex: ex[0]["style"] == "pointing"
                                 and ex[0]["points"] == [[3.0, 4.0], [30.0, 14.0]])

IMAGE_COLUMNS = ("image", "decoded_image", "image_1", "image_2", "images")


def _dataset(rows):
    ds = datasets.Dataset.from_list(rows)
    for col in IMAGE_COLUMNS:
        if col in ds.features:
            feature = datasets.List(datasets.Image()) if col == "images" else datasets.Image()
            ds = ds.cast_column(col, feature)
    return ds


def _read(out):
    return [decode_sample(s) for s in wds.tarfile_samples([{"url": u} for u in read_sizes(out)])]


def test_every_hf_source_has_a_case():
    assert set(CASES) == set(HF_SOURCES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_converter(name, tmp_path):
    rows, check = CASES[name]
    requested = []

    def fetch(url, timeout):
        requested.append(url)
        return JPEG

    summary = build.build_hf(HF_SOURCES[name], tmp_path / "out", split="train", dataset=_dataset(rows), fetch=fetch,
                             cache_dir=tmp_path / "cache", progress=False)
    examples = _read(tmp_path / "out")
    assert examples and check(examples), examples
    assert all(e["image"].size == (W, H) for e in examples)
    assert all(e["id"].startswith(f"{name}_train_") and e["metadata"]["dataset"] == name for e in examples)
    assert summary["examples"] == len(examples)
    assert bool(requested) == (HF_SOURCES[name].url_column is not None)


def test_input_path_reads_saved_dataset_and_parquet(tmp_path):
    rows, _ = CASES["chart_qa"]
    _dataset(rows * 3).save_to_disk(str(tmp_path / "saved"))
    _dataset(rows * 2).to_parquet(str(tmp_path / "train.parquet"))
    for path, n in ((tmp_path / "saved", 3), (tmp_path / "train.parquet", 2)):
        out = tmp_path / f"out_{n}"
        assert build.main(["--source", "chart_qa", "--out", str(out), "--input", str(path)]) == 0
        assert len(_read(out)) == n


def test_input_parquet_folder_takes_only_the_named_split(tmp_path):
    rows, _ = CASES["chart_qa"]  # MathVista's real layout: data/testmini-*.parquet next to data/test-*.parquet
    (tmp_path / "hub" / "data").mkdir(parents=True)
    _dataset(rows * 3).to_parquet(str(tmp_path / "hub" / "data" / "testmini-00000-of-00001.parquet"))
    _dataset(rows * 2).to_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"))
    for split, n in (("test", 2), ("testmini", 3)):
        summary = build.build("chart_qa", tmp_path / split, split=split, input_path=str(tmp_path / "hub"),
                              progress=False)
        assert summary["rows"] == n and len(_read(tmp_path / split)) == n


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: dict = {}

    def do_GET(self):
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if self.path == "/flaky.jpg" and self.hits[self.path] < 2:
            self.send_error(503)
        elif self.path in ("/ok.jpg", "/flaky.jpg", "/wrongsha.jpg"):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(JPEG)
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.hits = {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_sha_retries_failures_and_resume(server, tmp_path):
    rows = [{"image_url": f"{server}/{p}", "image_sha256": sha, "question": f"q{i}", "answer": "a"}
            for i, (p, sha) in enumerate([("ok.jpg", SHA), ("flaky.jpg", SHA), ("missing.jpg", SHA),
                                          ("wrongsha.jpg", "0" * 64)])]
    source = HF_SOURCES["pixmo_ask_model_anything"]
    fetcher_kw = dict(retries=3, timeout=5.0, backoff=0.01)
    fetcher = ImageFetcher(tmp_path / "cache", fetch=url_fetch(), **fetcher_kw)
    from molmo_fast.data.sources.hf import iter_records, with_raw_images
    lost = {}
    records = list(iter_records(source, with_raw_images(_dataset(rows)), "train", fetcher, workers=2, lost=lost))
    assert [r.example["messages"][0] for r in records] == ["q0", "q1"]
    assert _Handler.hits["/flaky.jpg"] == 2 and _Handler.hits["/missing.jpg"] == 1  # 404 is not retried
    assert fetcher.stats.fetched == 2 and fetcher.stats.failed == 2 and fetcher.stats.sha_mismatch == 1
    assert lost == {"download failed": 2}
    failures = {json.loads(p.read_text())["url"].rsplit("/", 1)[1] for p in (tmp_path / "cache/failed").iterdir()}
    assert failures == {"missing.jpg", "wrongsha.jpg"}

    # resume: cached images and recorded failures cost no request
    hits = dict(_Handler.hits)
    again = ImageFetcher(tmp_path / "cache", fetch=url_fetch(), **fetcher_kw)
    assert [again.get(r["image_url"], r["image_sha256"]) is not None for r in rows] == [True, True, False, False]
    assert _Handler.hits == hits and again.stats.cached == 2 and again.stats.failed == 2
    retry = ImageFetcher(tmp_path / "cache", fetch=url_fetch(), retry_failed=True, **fetcher_kw)
    assert retry.get(rows[2]["image_url"]) is None and _Handler.hits["/missing.jpg"] == 2


def test_cli_list_and_synthetic_build(tmp_path, capsys):
    assert build.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in list_sources()) and "synthetic_counting" in listed
    out = tmp_path / "count"
    assert build.main(["--source", "synthetic_counting", "--out", str(out), "--limit", "7", "--image-size", "64"]) == 0
    assert read_info(out)["num_samples"] == 7 and len(_read(out)) == 7
    with pytest.raises(SystemExit):
        build.main(["--source", "synthetic_counting"])


def test_build_never_writes_over_what_it_did_not_write(tmp_path):
    rows, _ = CASES["chart_qa"]
    _dataset(rows * 2).save_to_disk(str(tmp_path / "saved"))
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    for out in (user, tmp_path / "saved", tmp_path):  # a user dir, the input itself, the input's parent
        for flags in ([], ["--overwrite"]):
            with pytest.raises(SystemExit, match="molmo_fast.data.build: .*refusing"):
                build.main(["--source", "chart_qa", "--out", str(out), "--input", str(tmp_path / "saved"), *flags])
    assert os.listdir(user) == ["notes.txt"] and len(datasets.load_from_disk(str(tmp_path / "saved"))) == 2
    out = tmp_path / "out"
    assert build.main(["--source", "chart_qa", "--out", str(out), "--input", str(tmp_path / "saved")]) == 0
    with pytest.raises(SystemExit, match="already holds a molmo_fast data_build output; pass --overwrite"):
        build.main(["--source", "chart_qa", "--out", str(out), "--input", str(tmp_path / "saved")])
    assert build.main(["--source", "chart_qa", "--out", str(out), "--input", str(tmp_path / "saved"),
                       "--limit", "1", "--overwrite"]) == 0
    assert len(_read(out)) == 1
    assert sorted(os.listdir(tmp_path)) == ["mine", "out", "saved"]  # no temporary sibling left


def test_ai2d_keeps_the_box_flags_of_molmos_layout(tmp_path):
    rows = [{"image": IMG, "question": "Which?", "answer_texts": ["a", "b"], "correct_answer": 1, "abc_label": True,
             "has_transparent_box": False, "question_id": "4185.png-0", "image_name": "4185.png",
             "option_is_abc": [True, True]}]
    build.build_hf(HF_SOURCES["ai2d"], tmp_path / "out", split="test", dataset=_dataset(rows), progress=False)
    (ex,) = _read(tmp_path / "out")
    assert ex["options"] == ["a", "b"] and ex["answer_idx"] == 1
    assert ex["metadata"]["abc_label"] is True and ex["metadata"]["has_transparent_box"] is False


def test_mmmu_rows_without_one_valid_option_letter_are_skipped_not_mislabelled(tmp_path):
    base = CASES["mmmu"][0][0]
    rows = [{**base, "id": f"validation_Art_{k}", "answer": a} for k, a in enumerate(["B", "", "D", "['A', 'B']"])]
    summary = build.build_hf(HF_SOURCES["mmmu"], tmp_path / "out", split="validation", dataset=_dataset(rows),
                             progress=False)
    (ex,) = _read(tmp_path / "out")
    assert ex["metadata"]["id"] == "validation_Art_0" and ex["answer_idx"] == 1
    assert summary["rows_lost"] == {"skipped by the converter": 3}


def test_a_malformed_row_fails_with_the_row_named(tmp_path):
    rows = [dict(r) for r in CASES["a_okvqa"][0]]
    rows.append({**rows[0], "correct_choice_idx": None})  # as in A-OKVQA's test split, which has no answers
    with pytest.raises(ValueError, match=r"'a_okvqa', split 'test', row 1: .*correct_choice_idx"):
        build.build_hf(HF_SOURCES["a_okvqa"], tmp_path / "out", split="test", dataset=_dataset(rows), progress=False)
