"""Example -> conversation strings in Molmo's prompt format.

Chat format (fine-tuning / eval): every user turn is `" User: {msg} Assistant:"` and every answer `" {answer}"`;
the first user turn carries a `"{style}: "` prefix (`system_prompt_kind=demo_or_style`). Captioner format
(pre-training): `" long_caption {n}:"` + `" {caption}"` with a noisy length hint n. The preprocessor appends EOS
after each answer; this module only produces strings.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Styles whose prefix is usually dropped in training, so the model answers them by default.
DEMO_STYLES = frozenset({"point_count", "pointing", "user_qa", "long_caption"})
DEMO_PREFIX_DROP_PROB = 0.9
NO_PREFIX_STYLES = frozenset({"android_control", "demo"})
EVAL_STYLE_MAP = {"eval_short_answer": "vqa2", "eval_multiple_choice": "a_okvqa_mc"}
CAPTION_STYLES = frozenset({"long_caption", "transcript"})
# Questions that would otherwise trigger a pointing answer get one of these prefixes.
NO_POINTING_STYLES = frozenset({"user_qa", "synthetic_qa"})
HOW_MANY = re.compile(r"how many", re.IGNORECASE)

LONG_CAPTION_PROMPTS = (
    "Describe this image.",
    "Describe this image in detail.",
    "Write a detailed description of the image.",
    "What is in this picture? Be thorough.",
    "Give a long, complete caption for this image.",
    "Caption this image with as much detail as you can.",
    "Tell me everything you see in this image.",
)
TRANSCRIPT_PROMPTS = (
    "Describe this image as if you were speaking.",
    "Talk me through what is in this image.",
    "Give a spoken-style description of the picture.",
)
POINTING_PROMPTS = (
    "Point to {label}",
    "Point to the {label} in the image.",
    "Where are the {label}? Point to them.",
    "Show me where {label} is by pointing.",
    "Locate every {label} with a point.",
    "Mark all instances of {label}.",
)
POINT_COUNT_PROMPTS = (
    "How many {label} are there?",
    "Count the {label} in this image.",
    "How many {label} can you see? Point to them while counting.",
    "Point to and count the {label}.",
    "What is the number of {label} in the image?",
    "Count every {label}, pointing to each one.",
)
NO_POINTING_PREFIXES = (
    "No pointing: ",
    "Answer without pointing: ",
    "Do not point, just answer: ",
    "Reply in text only (no points): ",
)
MC_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def chat_user(message: str) -> str:
    return f" User: {message} Assistant:"


def chat_answer(answer: str) -> str:
    return f" {answer}"


def _fmt(v: float) -> str:
    return f"{v:.1f}"


def points_to_text(points: Sequence[Sequence[float]], label: str, image_size: Sequence[int] | None) -> str:
    """Pixel points of the original image -> `<point>`/`<points>` tag with percent coordinates (1 decimal),
    sorted by x then y; "There are none." without points. `image_size` is [width, height]; None means the
    points are already in percent."""
    if len(points) == 0:
        return "There are none."
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if image_size is not None:
        w, h = image_size
        pts = pts / np.array([w / 100.0, h / 100.0])
    pts = pts[np.argsort(pts[:, 0] * 10000 + pts[:, 1], kind="stable")]
    if len(pts) == 1:
        return f'<point x="{_fmt(pts[0, 0])}" y="{_fmt(pts[0, 1])}" alt="{label}">{label}</point>'
    coords = " ".join(f'x{i}="{_fmt(x)}" y{i}="{_fmt(y)}"' for i, (x, y) in enumerate(pts, start=1))
    return f'<points {coords} alt="{label}">{label}</points>'


def count_to_text(points: Sequence[Sequence[float]], label: str, image_size, count: int | None = None) -> str:
    n = len(points) if count is None else int(count)
    if len(points) == 0:
        # Counting data without point annotations still states the count.
        return "There are none." if n == 0 else f"There are {n}."
    return f"Counting the {points_to_text(points, label, image_size)} shows a total of {n}."


_POINT_RE = re.compile(r"<point\s+([^>]*)>", re.IGNORECASE)
_POINTS_RE = re.compile(r"<points\s+([^>]*)>", re.IGNORECASE)
_ATTR_RE = re.compile(r'([a-z]+)(\d*)\s*=\s*"([^"]*)"', re.IGNORECASE)


def parse_points(text: str, image_size: Sequence[int] | None = None) -> list[tuple[float, float]]:
    """Points in `<point x= y=>` / `<points x1= y1= ...>` tags of model output, in percent (or in pixels of an
    image of `image_size` = [width, height]). Malformed coordinates are skipped."""
    points = []
    for match in sorted([*_POINT_RE.finditer(text), *_POINTS_RE.finditer(text)], key=lambda m: m.start()):
        coords: dict[tuple[str, int], float] = {}
        for key, idx, val in _ATTR_RE.findall(match.group(1)):
            try:
                coords[(key.lower(), int(idx or 0))] = float(val)
            except ValueError:
                continue
        for k in sorted(i for key, i in coords if key == "x"):
            if ("y", k) in coords:
                points.append((coords[("x", k)], coords[("y", k)]))
    if image_size is not None:
        w, h = image_size
        points = [(x * w / 100.0, y * h / 100.0) for x, y in points]
    return points


@dataclass(frozen=True)
class Formatter:
    """kind="chat": fine-tune/eval chat format; kind="captioner": pre-training `" long_caption {n}:"` format."""

    kind: str = "chat"
    default_inference_len: int = 65
    length_hint_prob: float = 0.9
    length_noise_std: float = 25.0

    def __post_init__(self):
        if self.kind not in ("chat", "captioner"):
            raise ValueError(f"Formatter.kind must be 'chat' or 'captioner', got {self.kind!r}")

    def __call__(self, example: dict, rng: np.random.Generator | None = None,
                 for_inference: bool = False) -> list[list[str]]:
        if self.kind == "captioner":
            return [self._captioner(example, rng, for_inference)]
        style = EVAL_STYLE_MAP.get(example.get("style", ""), example.get("style", ""))
        if "message_list" in example:
            convs = [list(c) for c in example["message_list"]]
            if rng is not None:
                convs = [convs[i] for i in rng.permutation(len(convs))]
        else:
            convs = [self._raw_messages(example, style, rng)]
        return [self._chat(conv, style, rng, for_inference) for conv in convs]

    def _chat(self, raw: list[str], style: str, rng, for_inference: bool) -> list[str]:
        if for_inference:
            raw = raw[: len(raw) - 1] if len(raw) % 2 == 0 else raw
        elif len(raw) % 2:
            raise ValueError(f"a training conversation needs [user, assistant, ...] pairs, got {len(raw)} messages")
        out = []
        for k, msg in enumerate(raw):
            if k % 2:
                out.append(chat_answer(msg))
                continue
            if style in NO_POINTING_STYLES and HOW_MANY.search(msg):
                msg = _pick(NO_POINTING_PREFIXES, rng) + msg
            if k == 0:
                msg = self._style_prefix(style, rng) + msg
            out.append(chat_user(msg))
        return out

    @staticmethod
    def _style_prefix(style: str, rng) -> str:
        if not style or style in NO_PREFIX_STYLES:
            return ""
        if style in DEMO_STYLES and (rng is None or rng.random() < DEMO_PREFIX_DROP_PROB):
            return ""
        return f"{style}: "

    @staticmethod
    def _raw_messages(example: dict, style: str, rng) -> list[str]:
        """Content fields of the Example contract -> [user, assistant, ...] before chat formatting."""
        if "messages" in example:
            return list(example["messages"])
        if "options" in example:
            options = "\n".join(f"{MC_LETTERS[i]}: {opt}" for i, opt in enumerate(example["options"]))
            answer_idx = example.get("answer_idx")
            return [f"{example['question']}\n{options}\n", "" if answer_idx is None else MC_LETTERS[int(answer_idx)]]
        if "question" in example:
            return [example["question"], _most_frequent(example.get("answers") or [""], rng)]
        if "points" in example:
            label = example["label"]
            if style == "point_count":
                prompt = _pick(POINT_COUNT_PROMPTS, rng).format(label=label.lower())
                answer = count_to_text(example["points"], label, example.get("image_size"), example.get("count"))
            else:
                prompt = _pick(POINTING_PROMPTS, rng).format(label=label.lower())
                answer = points_to_text(example["points"], label, example.get("image_size"))
            return [prompt, answer]
        if "caption" in example:
            prompts = TRANSCRIPT_PROMPTS if style == "transcript" else LONG_CAPTION_PROMPTS
            return [_pick(prompts, rng), example["caption"]]
        raise ValueError(f"example {example.get('id')!r} has no content field "
                         f"(messages, message_list, question, points or caption)")

    def _captioner(self, example: dict, rng, for_inference: bool) -> list[str]:
        style = example.get("style", "long_caption")
        if style not in CAPTION_STYLES or (not for_inference and "caption" not in example):
            raise ValueError(f"captioner format needs style in {sorted(CAPTION_STYLES)} and a caption, "
                             f"got style {style!r} for example {example.get('id')!r}")
        if for_inference:
            return [f" {style} {self.default_inference_len}:"]
        caption = example["caption"]
        if rng is None:
            hint = f" {style} {len(caption) // 15}:"
        elif rng.random() < self.length_hint_prob:
            n = max(0, (len(caption) + int(rng.normal(scale=self.length_noise_std))) // 15)
            hint = f" {style} {n}:"
        else:
            hint = f" {style} :"
        return [hint, chat_answer(caption)]


def _pick(options: Sequence[str], rng) -> str:
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def _most_frequent(answers: Sequence[str], rng) -> str:
    counts = Counter(answers)
    top = max(counts.values())
    tied = [a for a in counts if counts[a] == top]
    return tied[0] if rng is None or len(tied) == 1 else tied[int(rng.integers(len(tied)))]


DEFAULT_FORMATTER = Formatter()


def format_example(example: dict, rng: np.random.Generator | None = None,
                   for_inference: bool = False) -> list[list[str]]:
    """Chat-format `example` (the shared Example contract) into conversations of final message strings."""
    return DEFAULT_FORMATTER(example, rng, for_inference)
