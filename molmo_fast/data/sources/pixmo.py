"""PixMo converters (allenai/pixmo-*), with the datasets' real column names.

Points: pixmo-points and pixmo-points-eval store percent coordinates (Molmo reads them with point_scale=100), so
they are converted to pixels of the original image here; pixmo-count stores pixels. Shards always hold pixels.
One HF row becomes one example (rows are not grouped per image, so a shard never depends on row order).
pixmo-points drops the images of pixmo-points-eval, as Molmo does; pixmo-clocks has no images on the hub (--input).
"""

from __future__ import annotations

import base64
import re

import numpy as np

from molmo_fast.data.formatter import points_to_text
from molmo_fast.data.sources.hf import HFSource, as_list, xy_points

POINT_PLACEHOLDER = "<|POINT|>"


def _percent_to_pixels(points: list[list[float]], size: tuple[int, int]) -> list[list[float]]:
    w, h = size
    return [[round(x * w / 100.0, 2), round(y * h / 100.0, 2)] for x, y in points]


def pixmo_cap(row, size):
    # the captioner formatter reads `caption`; transcripts ride along for the transcript style
    return [{"style": "long_caption", "caption": row["caption"],
             "metadata": {"image_url": row["image_url"], "transcripts": as_list(row.get("transcripts"))}}]


_TURN_TAG = re.compile(r"\[(USER|ASSISTANT)\]")


def tagged_turns(question: str, answer: str) -> list[str]:
    """PixMo-CapQA's `question` holds the conversation so far as "[USER] q [ASSISTANT] a [USER] q ... [ASSISTANT]"
    and `answer` the last reply: -> [user, assistant, ...]. An untagged question is one user turn."""
    parts = _TURN_TAG.split(question)
    if len(parts) == 1:
        return [question.strip(), answer]
    if parts[0].strip():
        raise ValueError(f"text before the first [USER] tag: {parts[0][:60]!r}")
    turns = []
    for k, (role, text) in enumerate(zip(parts[1::2], parts[2::2])):
        if role != ("USER" if k % 2 == 0 else "ASSISTANT"):
            raise ValueError(f"turn {k} is tagged [{role}]; turns must alternate [USER] / [ASSISTANT]")
        turns.append(text.strip())
    if len(turns) % 2 == 1:
        return turns + [answer]
    if turns[-1]:
        raise ValueError("the question already ends with an [ASSISTANT] reply; nowhere to put `answer`")
    return turns[:-1] + [answer]


def pixmo_cap_qa(row, size):
    messages = as_list(row.get("messages")) or tagged_turns(row["question"], row["answer"])
    return [{"style": "synthetic_qa", "messages": [str(m) for m in messages],
             "metadata": {"image_url": row["image_url"]}}]


def pixmo_ask_model_anything(row, size):
    return [{"style": "user_qa", "messages": [row["question"], row["answer"]],
             "metadata": {"image_url": row["image_url"]}}]


def _points_example(row, size, style, percent):
    points = xy_points(row["points"])
    if percent:
        points = _percent_to_pixels(points, size)
    count = row.get("count")
    return {"style": style, "points": points, "label": row["label"],
            "count": int(count) if count is not None else len(points),
            "metadata": {"image_url": row["image_url"], **({"collection_method": row["collection_method"]}
                                                           if row.get("collection_method") else {})}}


def points(style: str, percent: bool):
    # Molmo's PixMoPoints inverts the two style names; here point_count is always the counting
    # answer ("Counting the <points ...> shows a total of N.") and pointing the bare points
    def convert(row, size):
        return [_points_example(row, size, style, percent)]
    return convert


def pixmo_points_eval(row, size):
    example = _points_example(row, size, "pointing", percent=True)
    masks = np.asarray(row["masks"], dtype=bool)
    # packed bits keep per-point image-sized masks small inside the JSON
    example["metadata"]["masks"] = {"shape": list(masks.shape),
                                    "packbits": base64.b64encode(np.packbits(masks)).decode("ascii")}
    return [example]


def unpack_masks(masks: dict) -> np.ndarray:
    """Inverse of the mask packing of pixmo_points_eval: `metadata["masks"]` -> bool array [n, H, W]."""
    shape = masks["shape"]
    bits = np.unpackbits(np.frombuffer(base64.b64decode(masks["packbits"]), dtype=np.uint8))
    return bits[: int(np.prod(shape))].reshape(shape).astype(bool)


def _inline_points(response: str, alt_texts, inline_texts, point_groups) -> str:
    """Replace each <|POINT|> placeholder with the point tag of its annotation (percent coordinates)."""
    parts = response.split(POINT_PLACEHOLDER)
    out = [parts[0]]
    for k, rest in enumerate(parts[1:]):
        if k < len(point_groups):
            alt = alt_texts[k] if k < len(alt_texts) else ""
            inline = inline_texts[k] if k < len(inline_texts) else alt
            tag = points_to_text(xy_points(point_groups[k]), alt, None)
            if inline != alt:
                tag = re.sub(r">[^<]*</point(s?)>$", lambda m: f">{inline}</point{m.group(1)}>", tag)
            out.append(tag)
        out.append(rest)
    return "".join(out)


def pixmo_point_explanations(row, size):
    response = row.get("parsed_response")
    if response is None:
        return []
    answer = _inline_points(response, as_list(row.get("alt_text")), as_list(row.get("inline_text")),
                            as_list(row.get("points")))
    return [{"style": "point_qa", "messages": [row["question"], answer],
             "metadata": {"image_url": row["image_url"]}}]


CLOCK_QUESTION = "What time is being shown?"  # Molmo's clock prompt (ClockBench)
CLOCK_FIELDS = ("example_id", "watchface_name", "time_format", "shows_seconds", "hour_visible", "minute_visible",
                "second_visible")


def pixmo_clocks(row, size):
    # `text` is the time as the watch face shows it ("8:15:30", "7:57:39 AM"); -1 marks a hand that is not drawn
    return [{"style": "clocks", "question": CLOCK_QUESTION, "answers": [row["text"]],
             "metadata": {k: row[k] for k in CLOCK_FIELDS if k in row}}]


def pixmo_docs(doc_type: str):
    def convert(row, size):
        qas = row["questions"]
        if isinstance(qas, dict):  # datasets gives a struct of lists
            pairs = list(zip(qas["question"], qas["answer"]))
        else:
            pairs = [(qa["question"], qa["answer"]) for qa in qas]
        return [{"style": f"pixmo_docs_{doc_type}", "message_list": [[q, a] for q, a in pairs],
                 "metadata": {"image_id": row.get("image_id")}}]
    return convert


def _url(name, hub_id, convert, sha=True, **kw):
    return HFSource(name, hub_id, convert, image_column=None, url_column="image_url",
                    sha_column="image_sha256" if sha else None, **kw)


POINTS_EVAL = ("allenai/pixmo-points-eval", "test")  # Molmo keeps these images out of pixmo-points training
COUNT_SPLITS = ("train", "validation", "test")
NO_EVAL_POINTS = ("allenai/pixmo-count has no points for its validation and test rows (only the count), so every "
                  "pointing target would be 'There are none.'; use pixmo_count (counting) on those splits")
CLOCKS_INPUT = ("allenai/pixmo-clocks holds the watch-face metadata only; its images are rendered from facer.io "
                "watch faces, which are not public: pass --input with these columns plus an `image` column of the "
                "renders")

SOURCES = [
    _url("pixmo_cap", "allenai/pixmo-cap", pixmo_cap, sha=False, description="dense captions (pretraining)"),
    _url("pixmo_cap_qa", "allenai/pixmo-cap-qa", pixmo_cap_qa, sha=False, description="synthetic QA from captions"),
    _url("pixmo_ask_model_anything", "allenai/pixmo-ask-model-anything", pixmo_ask_model_anything,
         description="human-authored image QA"),
    _url("pixmo_points", "allenai/pixmo-points", points("pointing", percent=True), holdout=POINTS_EVAL,
         description="pointing"),
    _url("pixmo_points_counting", "allenai/pixmo-points", points("point_count", percent=True), holdout=POINTS_EVAL,
         description="the same rows as counting (point_count)"),
    _url("pixmo_point_explanations", "allenai/pixmo-point-explanations", pixmo_point_explanations,
         description="answers with inline points"),
    _url("pixmo_count", "allenai/pixmo-count", points("point_count", percent=False), sha=False, verify_ssl=False,
         splits=COUNT_SPLITS, description="counting (validation/test: the count only)"),
    _url("pixmo_count_pointing", "allenai/pixmo-count", points("pointing", percent=False), sha=False,
         verify_ssl=False, splits=COUNT_SPLITS, refused=(("validation", NO_EVAL_POINTS), ("test", NO_EVAL_POINTS)),
         description="the same rows as pointing (train only)"),
    _url("pixmo_points_eval", "allenai/pixmo-points-eval", pixmo_points_eval, splits=("test",),
         default_split="test", description="pointing eval with masks"),
    HFSource("pixmo_clocks", "allenai/pixmo-clocks", pixmo_clocks, splits=("train", "validation"),
             needs_input=CLOCKS_INPUT, description="watch faces and their time"),
    *[HFSource(f"pixmo_docs_{t}", "allenai/pixmo-docs", pixmo_docs(t), configs=(t,), splits=("train", "validation"),
               description=f"synthetic {t} documents, multi-QA") for t in ("charts", "tables", "diagrams", "other")],
]
