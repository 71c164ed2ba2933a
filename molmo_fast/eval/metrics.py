"""Molmo's benchmark metrics with the semantics of the official scripts.

Every scorer takes the cleaned model output (`clean_prediction`) and the ground truth and returns a float in
[0, 1]; `pointing_scores` returns a dict. Where the official code has a quirk that changes scores, it is kept
and the comment says so; where a quirk cannot change a published number, the intended behaviour is used.
"""

import math
import random
import re
import zlib
from collections import Counter
from collections.abc import Sequence

from molmo_fast.data.formatter import parse_points
from molmo_fast.eval.hungarian import hungarian

# ---------------------------------------------------------------------------------------------------------
# Prediction clean-up (Molmo's VqaEval, applied before every short-answer metric)


def clean_prediction(text: str) -> str:
    """Keep the text after "Answer:", else the most frequent line of a multi-line output; collapse spaces."""
    text = text.strip()
    if "Answer:" in text:
        return text.split("Answer:")[1].strip()
    if "\n" in text:
        lines = [" ".join(line.split()) for line in text.split("\n")]
        counts = Counter(lines)
        top = max(counts.values())
        return next(line for line in lines if counts[line] == top)
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------------------
# VQA normalisation (the VQA v2 evaluation script as Molmo runs it)

# Canonical forms; the script maps every spelling with exactly one apostrophe removed onto them.
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd
he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll
that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've
we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's
who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've
you'll you're you've
""".split()
CONTRACTIONS = {
    form[:i] + form[i + 1:]: form for form in _CONTRACTED for i, ch in enumerate(form) if ch == "'"
}
# The official table maps this one backwards; both sides of a comparison go through it, so keep it.
CONTRACTIONS["somebody'd"] = "somebodyd"

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# The script's pattern is "(?!<=\d)(\.)(?!\d)": a mistyped look-behind that never fires, so a period is
# removed unless a digit follows it ("2.5" stays, "1." loses it).
_PERIOD = re.compile(r"\.(?!\d)")
# The script passes re.UNICODE (= 32) as the positional `count` of sub(), so at most 32 periods go.
_MAX_PERIODS_REMOVED = 32


def _strip_punctuation(text: str) -> str:
    out = text
    has_number_comma = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCTUATION:
        # Conditions look at the input, not the partially cleaned output, exactly as the script does.
        if p + " " in text or " " + p in text or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS_REMOVED)


def normalize_vqa_answer(text: str) -> str:
    """Lowercase, punctuation rules, number words -> digits, drop articles, restore contractions."""
    text = text.replace("\n", " ").replace("\t", " ").lower().strip()
    words = [NUMBER_WORDS.get(w, w) for w in _strip_punctuation(text).split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _as_list(answers: str | Sequence[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def vqa_score(prediction: str, answers: str | Sequence[str]) -> float:
    """min(#annotators agreeing / 3, 1) after VQA normalisation.

    Molmo uses this simplified form, not the official average over the 10 choose 9 annotator subsets.
    """
    pred = normalize_vqa_answer(prediction)
    counts = Counter(normalize_vqa_answer(a) for a in _as_list(answers))
    if isinstance(answers, str):
        return float(counts[pred] > 0)
    return min(counts[pred] / 3.0, 1.0)


def a_okvqa_score(prediction: str, answers: Sequence[str]) -> float:
    """A-OKVQA direct answer: like vqa_score but with only lowercase/strip normalisation."""
    counts = Counter(a.lower().strip() for a in answers)
    return min(counts[prediction.lower().strip()] / 3.0, 1.0)


# ---------------------------------------------------------------------------------------------------------
# String-similarity metrics


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit costs)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _anls_normalize(text: str) -> str:
    return " ".join(text.lower().split())


def anls(prediction: str, answers: str | Sequence[str], threshold: float = 0.5) -> float:
    """Average normalised Levenshtein similarity (DocVQA/InfoVQA), max over answers.

    Both sides are lowercased with whitespace collapsed, as the official script does, and lengths are taken after
    that (lowercasing can change a string's length). An empty prediction matches only an empty answer."""
    pred = _anls_normalize(prediction)
    best = 0.0
    for answer in _as_list(answers):
        gold = _anls_normalize(answer)
        longest = max(len(gold), len(pred))
        dist = edit_distance(gold, pred) / longest if longest else 0.0
        best = max(best, 1.0 - dist if dist < threshold else 0.0)
    return best


def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, answers: str | Sequence[str], max_relative_change: float = 0.05) -> float:
    """ChartQA: numbers within 5% relative error ("x%" is x/100), otherwise case-insensitive exact match.

    As in the official script (and so in the published numbers), "x%" is compared as x/100 against a bare "x"
    (so "45%" vs "45" is wrong) and a thousands separator makes a string, not a number ("1,234" matches only
    "1,234")."""
    pred = _to_float(prediction)
    for answer in _as_list(answers):
        target = _to_float(answer)
        # A zero target falls through to string equality (relative error is undefined), as in the script.
        if pred is not None and target:
            if abs(pred - target) / abs(target) <= max_relative_change:
                return 1.0
        elif prediction.lower() == answer.lower():
            return 1.0
    return 0.0


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """Case-insensitive exact match against any answer."""
    return float(prediction.lower() in {a.lower() for a in _as_list(answers)})


# ---------------------------------------------------------------------------------------------------------
# Multiple choice

# An option letter, alone or leading the answer: "B", "(B)", "B.", "B) text", "B: text", also after "Answer:",
# "The answer is", "Option"; a letter followed by a word ("A cat") is text, not a letter.
_LETTER = re.compile(r"^(?:(?:the\s+)?(?:correct\s+)?(?:answer|option)(?:\s+is)?\s*:?\s*)?"
                     r"\(?([a-z])(?:[.):]\s*.*)?\)?$", re.DOTALL | re.IGNORECASE)


def select_option(prediction: str, options: Sequence[str]) -> int:
    """Index of the option a free-form answer names.

    Order: the option letter ("B", "(B)", "B. text"), the exact option text, a unique prefix/substring match
    (Molmo's select_mc_option), a unique option inside the answer, then the smallest edit distance.
    """
    letter = _LETTER.match(prediction.strip().strip("*").strip())  # markdown bold around the letter
    if letter:
        idx = ord(letter.group(1).upper()) - ord("A")
        if 0 <= idx < len(options):
            return idx
    target = prediction.lower().strip()
    opts = [o.lower().strip() for o in options]
    if target in opts:
        return opts.index(target)
    # Molmo's three prefix/substring rules, then (ours, before falling back to edit distance) an option quoted
    # inside a longer answer.
    for matches in (lambda o: target.startswith(o), lambda o: o.startswith(target), lambda o: target in o,
                    lambda o: o in target):
        hits = [i for i, o in enumerate(opts) if matches(o)]
        if len(hits) == 1:
            return hits[0]
    distances = [edit_distance(o, target) for o in opts]
    return distances.index(min(distances))


def multiple_choice(prediction: str, options: Sequence[str], answer_index: int) -> float:
    """1.0 if the prediction selects options[answer_index]."""
    return float(select_option(prediction, options) == answer_index)


# ---------------------------------------------------------------------------------------------------------
# Counting

COUNT_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_TOTAL = re.compile(r".*a total of ([0-9]+).*")
_NONE = re.compile(r".*\bnone\b.*")


def parse_count(prediction: str) -> int | None:
    """Molmo's PointCountEval parse: last word as int, else as a number word, else "a total of N", else
    "none" -> 0.

    (The official "none" regex is a non-raw string whose \\b is a backspace and never matches; that only
    matters when the true count is 0, which neither CountBenchQA nor PixMo-Count contains.)
    """
    pred = prediction.strip().lower().rstrip(".").strip()
    words = pred.split()
    if words:
        try:
            return int(words[-1])
        except ValueError:
            if words[-1] in COUNT_WORDS:
                return COUNT_WORDS[words[-1]]
    match = _TOTAL.match(pred)
    if match:
        return int(match.group(1))
    return 0 if _NONE.match(pred) else None


def count_accuracy(prediction: str, count: int) -> float:
    """1.0 if the parsed count equals the true count (an unparseable output is wrong)."""
    return float(parse_count(prediction) == int(count))


# ---------------------------------------------------------------------------------------------------------
# Pointing (predicted points matched to ground truth by `hungarian`)

_POINT_OUTPUT = re.compile(
    r'<point\s+x="\s*\d+(?:\.\d+)?"\s+y="\s*\d+(?:\.\d+)?"\s+alt=".*?">.*?</point>'
    r'|<points\s+(?:x\d+="\s*\d+(?:\.\d+)?"\s+y\d+="\s*\d+(?:\.\d+)?"\s+)+alt=".*?">.*?</points>',
    re.DOTALL,
)


def is_valid_point_output(prediction: str) -> bool:
    """Molmo's pointing eval accepts only an output that is exactly one `<point>` or `<points>` tag."""
    return _POINT_OUTPUT.fullmatch(prediction.strip()) is not None


def _in_mask(point: Sequence[float], mask) -> bool:
    x, y = int(round(point[0])), int(round(point[1]))
    height, width = len(mask), len(mask[0])
    return 0 <= x < width and 0 <= y < height and bool(mask[y][x])


def pointing_scores(
    prediction: str,
    gt_points: Sequence[Sequence[float]],
    image_size: Sequence[int],
    masks: Sequence | None = None,
    max_distance: float | None = None,
) -> dict[str, float]:
    """Precision/recall/F1 of predicted points (percent coordinates in the text) against ground-truth pixels.

    Points are Hungarian-matched by Euclidean distance; a matched pair counts when the predicted point lies
    in that ground truth's mask ([H][W] booleans), or, without masks, within `max_distance` pixels (default
    5% of the image diagonal). An output that is not a well-formed point answer scores 0; with no ground-truth
    points the score is 1 iff nothing is predicted.
    """
    width, height = image_size
    # Molmo drops points beyond 100% of the image as invalid output.
    pred = [(x, y) for x, y in parse_points(prediction, image_size) if x <= width and y <= height]
    gts = [(float(x), float(y)) for x, y in gt_points]
    if not gts:
        score = float(not pred)
        return dict(precision=score, recall=score, f1=score)
    if not pred or not is_valid_point_output(prediction):
        return dict(precision=0.0, recall=0.0, f1=0.0)
    if masks is not None and len(masks) != len(gts):
        raise ValueError(f"pointing_scores: {len(masks)} masks for {len(gts)} ground-truth points")
    radius = 0.05 * math.hypot(width, height) if max_distance is None else max_distance
    dist = [[math.dist(p, g) for g in gts] for p in pred]
    hits = sum(
        _in_mask(pred[i], masks[j]) if masks is not None else dist[i][j] <= radius
        for i, j in hungarian(dist)
    )
    precision, recall = hits / len(pred), hits / len(gts)
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return dict(precision=precision, recall=recall, f1=f1)


# ---------------------------------------------------------------------------------------------------------
# MMMU (the official parse_multi_choice_response / parse_open_response / eval_open)


def mmmu_parse_multi_choice(response: str, options: Sequence[str]) -> str:
    """The option letter an MMMU answer names; an unparseable answer gets a letter drawn from a fixed seed
    (the official script draws at random) keyed by the response, so reruns agree."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    for ch in ",.!?;:'":
        response = response.strip(ch)
    response = f" {response} "
    candidates = [c for c in letters if f"({c})" in response]
    bracketed = bool(candidates)
    if not candidates:
        candidates = [c for c in letters if f" {c} " in response]
    by_content = False
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, text in zip(letters, options) if text.lower() in response.lower()]
        by_content = bool(candidates)
    if not candidates:
        return random.Random(zlib.crc32(response.encode())).choice(letters)
    if len(candidates) == 1:
        return candidates[0]
    if by_content:
        starts = [response.lower().rfind(options[letters.index(c)].lower()) for c in candidates]
    else:
        starts = [response.rfind(f"({c})" if bracketed else f" {c} ") for c in candidates]
    return candidates[starts.index(max(starts))]


def _mmmu_normalize(text: str) -> list:
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        # A one-character answer is padded so that it does not match inside any longer word.
        return [" " + text, text + " "] if len(text) == 1 else [text]


_NUMBER_PATTERNS = (
    re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),
    re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),
    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"),
)
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def mmmu_parse_open(response: str) -> list:
    """Candidate answers (floats rounded to 2 places, or lowercased strings) from an open MMMU response."""
    response = response.strip().strip(".").lower()
    parts = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for i, part in enumerate(parts):
        indicators = _KEY_INDICATORS + (("=",) if i == len(parts) - 1 else ())
        tails = [part.split(ind)[-1].strip() for ind in indicators if ind in part]
        if tails:
            shortest = min(tails, key=len)
            if shortest and shortest not in {":", ",", ".", "!", "?", ";", "'"}:
                keys.append(shortest)
    keys = keys or [response]
    candidates = keys + [n for key in keys for pattern in _NUMBER_PATTERNS for n in pattern.findall(key)]
    return list({value for c in candidates for value in _mmmu_normalize(c)})


def mmmu_score(prediction: str, answer: str | Sequence[str], question_type: str,
               options: Sequence[str] = ()) -> float:
    """MMMU: letter match for "multiple-choice", the official open-answer matching otherwise."""
    answers = _as_list(answer)
    if question_type == "multiple-choice":
        options = [o for o in options if o]
        return float(mmmu_parse_multi_choice(prediction, options) in answers)
    gold = [g for a in answers for g in _mmmu_normalize(a)]
    for pred in mmmu_parse_open(prediction):
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in gold):
                return 1.0
        elif pred in gold:
            return 1.0
    return 0.0


# ---------------------------------------------------------------------------------------------------------
# MathVista (heuristic answer extraction; the official score asks GPT-4, which we never call)

_ANSWER_IS = re.compile(r"answer(?: is|:)\s*\(?([^\n]*?)\)?\s*\.?\s*$", re.IGNORECASE | re.MULTILINE)
_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def math_vista_extract(response: str, question_type: str, answer_type: str, choices: Sequence[str] = ()) -> str:
    """Pull the final answer out of a free-form MathVista response without an API call."""
    response = response.strip()
    if question_type == "multi_choice":
        if response in choices:
            return response
        stated = _ANSWER_IS.search(response)
        return choices[select_option(stated.group(1) if stated else response, choices)]
    stated = _ANSWER_IS.search(response)
    tail = stated.group(1) if stated else response
    if answer_type == "list":
        bracket = re.findall(r"\[[^\]]*\]", tail) or re.findall(r"\[[^\]]*\]", response)
        return bracket[-1] if bracket else tail
    if answer_type in ("integer", "float"):
        numbers = _LAST_NUMBER.findall(tail) or _LAST_NUMBER.findall(response)
        return numbers[-1].replace(",", "") if numbers else tail
    return tail


def math_vista_normalize(extraction: str, question_type: str, answer_type: str, choices: Sequence[str] = (),
                         precision: int | None = None) -> str | None:
    """The official normalize_extracted_answer: map to a choice text, an int string or a rounded float."""
    if question_type == "multi_choice":
        extraction = extraction.strip()
        if extraction in choices:  # checked first: a choice's own text may hold "(x)"
            return extraction
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)  # "(B) text" -> "B"
        extraction = letter[0].upper() if letter else extraction
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in letters:
            return choices[letters.index(extraction)]
        distances = [edit_distance(extraction, c) for c in choices]
        return choices[distances.index(min(distances))]
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(precision or 0)))
    except ValueError:
        return None
    return str(extraction)


def math_vista_score(prediction: str, answer: str, question_type: str, answer_type: str,
                     choices: Sequence[str] = (), precision: int | None = None) -> float:
    """1.0 if the heuristically extracted, normalised answer equals the reference answer string."""
    extraction = math_vista_extract(prediction, question_type, answer_type, choices)
    return float(math_vista_normalize(extraction, question_type, answer_type, choices, precision) == answer)


# ---------------------------------------------------------------------------------------------------------
# Clocks

_TIME = re.compile(r"(\d{1,2})\s*:\s*(\d{2})")


def parse_time(text: str) -> tuple[int, int] | None:
    """(hour on a 12-hour dial, minute) of the first "H:MM" in the text."""
    match = _TIME.search(text)
    return (int(match.group(1)) % 12, int(match.group(2))) if match else None


def clock_accuracy(prediction: str, answer: str, tolerance_minutes: int = 0) -> float:
    """1.0 if the predicted dial time is within `tolerance_minutes` of the answer (wrapping around 12:00)."""
    pred, gold = parse_time(prediction), parse_time(answer)
    if pred is None or gold is None:
        return 0.0
    diff = abs((pred[0] * 60 + pred[1]) - (gold[0] * 60 + gold[1]))
    return float(min(diff, 720 - diff) <= tolerance_minutes)
