import itertools
import random

import pytest

from molmo_fast.data.formatter import count_to_text, points_to_text
from molmo_fast.eval import metrics as M


# ------------------------------------------------------------------ clean-up and VQA normalisation
def test_clean_prediction_rules():
    assert M.clean_prediction("  The answer\nAnswer:  blue car ") == "blue car"
    assert M.clean_prediction("red\nblue\n  blue ") == "blue"  # majority line, whitespace collapsed
    assert M.clean_prediction("red\nblue") == "red"  # ties go to the first line
    assert M.clean_prediction(" a   big\tdog ") == "a big dog"


@pytest.mark.parametrize("raw, norm", [
    ("The Dog", "dog"),                     # lowercase, article dropped
    ("an apple and a pear", "apple and pear"),
    ("Two", "2"), ("none", "0"), ("ten", "10"), ("eleven", "eleven"),  # manualMap stops at ten
    ("1,000", "1000"),                      # comma inside a number: punctuation removed, not spaced
    ("yes, sir", "yes sir"),                # "p " present -> removed
    ("left/right", "left right"),           # no adjacent space -> replaced by a space
    ("2.5", "2.5"), ("end.", "end"), ("1.", "1"),  # a period survives only before a digit
    ("dont", "don't"), ("whats up", "what's up"), ("couldnt've", "couldn't've"), ("im", "im"),
    ("hello\tworld\n", "hello world"),
    ("it's", "it's"),                       # apostrophes are not punctuation here
    ("x - y", "x y"), ("a, b, and c.", "b and c"),
])
def test_vqa_normalisation(raw, norm):
    assert M.normalize_vqa_answer(raw) == norm


def test_vqa_score_is_min_matches_over_three():
    answers = ["2", "two", "2", "3", "three", "4", "4", "4", "4", "5"]
    assert M.vqa_score("Two", answers) == 1.0
    assert M.vqa_score("3", answers) == pytest.approx(2 / 3)
    assert M.vqa_score("5.", answers) == pytest.approx(1 / 3)
    assert M.vqa_score("6", answers) == 0.0
    assert M.vqa_score("The dog", "dog") == 1.0


def test_a_okvqa_score_only_lowercases():
    assert M.a_okvqa_score(" Dog ", ["dog"] * 3) == 1.0
    assert M.a_okvqa_score("the dog", ["dog"] * 3) == 0.0


# ------------------------------------------------------------------ ANLS, relaxed correctness, EM
def test_anls():
    assert M.anls("Hello", ["hello"]) == 1.0
    assert M.anls("helo", ["hello"]) == pytest.approx(0.8)
    assert M.anls("abcd", ["abxy"]) == 0.0  # normalised distance exactly 0.5 is not < threshold
    assert M.anls("abcd", ["abxy"], threshold=0.6) == pytest.approx(0.5)
    assert M.anls("abc", ["zzz", "abd"]) == pytest.approx(2 / 3)  # max over answers
    assert M.anls("Hello", ["  hello "]) == 1.0 and M.anls("big  dog", ["big dog"]) == 1.0  # whitespace collapsed
    assert M.anls("", [""]) == 1.0 and M.anls("", ["x"]) == 0.0 and M.anls("x", [""]) == 0.0  # empty strings
    assert M.anls("x", []) == 0.0
    assert M.edit_distance("kitten", "sitting") == 3


def test_relaxed_correctness():
    assert M.relaxed_correctness("105", ["100"]) == 1.0
    assert M.relaxed_correctness("105.1", ["100"]) == 0.0
    assert M.relaxed_correctness("95", ["100"]) == 1.0
    assert M.relaxed_correctness("12%", ["0.12"]) == 1.0  # "%" divides by 100
    assert M.relaxed_correctness("12", ["0.12"]) == 0.0
    assert M.relaxed_correctness("Yes", ["yes"]) == 1.0
    assert M.relaxed_correctness("0.0", ["0"]) == 0.0  # zero target: string comparison
    assert M.relaxed_correctness("0", ["0"]) == 1.0
    assert M.relaxed_correctness("7", ["x", "7.2"]) == 1.0
    # The official script's edge cases, kept so the numbers stay comparable with the paper:
    assert M.relaxed_correctness("45%", ["45"]) == 0.0 and M.relaxed_correctness("45", ["45%"]) == 0.0
    assert M.relaxed_correctness("45%", ["45%"]) == 1.0 and M.relaxed_correctness("46%", ["0.45"]) == 1.0
    assert M.relaxed_correctness("1,234", ["1234"]) == 0.0  # a separator makes it a string...
    assert M.relaxed_correctness("1,234", ["1,234"]) == 1.0  # ...compared exactly
    assert M.relaxed_correctness("1,250", ["1,234"]) == 0.0
    assert M.relaxed_correctness("-5", ["-5.1"]) == 1.0  # relative to |target|


def test_exact_match():
    assert M.exact_match("Paris", ["paris", "France"]) == 1.0
    assert M.exact_match("Paris.", ["paris"]) == 0.0


# ------------------------------------------------------------------ multiple choice
@pytest.mark.parametrize("pred, idx", [
    ("B", 1), ("(c)", 2), ("C. a bird", 2), ("a dog", 1), ("dog", 1),
    ("the cat is on the mat", 0),   # the output starts with exactly one option ("the cat")
    ("bir", 2),                     # unique option prefix
    ("i would say a bird, surely", 2),  # the one option quoted inside a longer answer
    ("catt", 0),                    # nothing matches: smallest edit distance
    ("(B)", 1), ("B.", 1), ("b) a dog", 1), ("Answer: B", 1), ("answer: (c)", 2), ("The answer is C.", 2),
    ("The correct option is A", 0), ("Option B", 1), ("**B**", 1), ("**C.** a bird", 2),
    ("The answer is a dog", 1),     # a letter followed by a word is text
    ("Z", 1),                       # no option Z: treated as text, nearest option by edit distance
])
def test_multiple_choice(pred, idx):
    options = ["the cat", "a dog", "a bird"]
    assert M.select_option(pred, options) == idx
    assert M.multiple_choice(pred, options, idx) == 1.0
    assert M.multiple_choice(pred, options, (idx + 1) % 3) == 0.0


# ------------------------------------------------------------------ counting
@pytest.mark.parametrize("pred, count", [
    ("3", 3), ("There are 7.", 7), ("five", 5), ("Twelve.", 12),
    (count_to_text([[1, 2], [3, 4]], "cats", [10, 10]), 2),
    ("There are none.", 0), ("I count a total of 4 dogs here", 4),
])
def test_count_accuracy_parses(pred, count):
    assert M.parse_count(pred) == count
    assert M.count_accuracy(pred, count) == 1.0
    assert M.count_accuracy(pred, count + 1) == 0.0


def test_count_unparseable_is_wrong():
    assert M.parse_count("several dogs") is None
    assert M.count_accuracy("several dogs", 0) == 0.0


# ------------------------------------------------------------------ pointing
def _brute_force_cost(cost):
    rows, cols = len(cost), len(cost[0])
    if rows > cols:
        cost = [list(col) for col in zip(*cost)]
        rows, cols = cols, rows
    return min(sum(cost[r][c] for r, c in enumerate(perm)) for perm in itertools.permutations(range(cols), rows))


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (2, 5), (5, 2), (4, 4)])
def test_hungarian_is_optimal(shape):
    rng = random.Random(sum(shape))
    for _ in range(20):
        cost = [[rng.randint(0, 9) for _ in range(shape[1])] for _ in range(shape[0])]
        pairs = M.hungarian(cost)
        assert len(pairs) == min(shape)
        assert len({r for r, _ in pairs}) == len({c for _, c in pairs}) == min(shape)
        assert sum(cost[r][c] for r, c in pairs) == _brute_force_cost(cost)


def test_pointing_scores_with_distance():
    size = [200, 100]
    gt = [[20, 10], [100, 50], [180, 90]]
    perfect = points_to_text(gt, "dot", size)
    assert M.pointing_scores(perfect, gt, size) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    two = points_to_text(gt[:2], "dot", size)
    s = M.pointing_scores(two, gt, size)
    assert (s["precision"], s["recall"]) == (1.0, pytest.approx(2 / 3)) and s["f1"] == pytest.approx(0.8)
    far = points_to_text([[20, 10], [100, 10]], "dot", size)  # the second point is 40 px off; radius ~11 px
    s = M.pointing_scores(far, gt, size)
    assert (s["precision"], s["recall"]) == (0.5, pytest.approx(1 / 3))
    assert M.pointing_scores(far, gt, size, max_distance=50.0)["precision"] == 1.0


def test_pointing_scores_with_masks_and_hungarian_matching():
    size = [10, 10]
    mask_a = [[x < 5 for x in range(10)] for _ in range(10)]   # left half
    mask_b = [[x >= 5 for x in range(10)] for _ in range(10)]  # right half
    gt = [[2, 5], [8, 5]]
    # Both predictions are nearest to their own ground truth, and each lies in that ground truth's mask.
    pred = points_to_text([[3, 5], [7, 5]], "x", size)
    assert M.pointing_scores(pred, gt, size, masks=[mask_a, mask_b])["f1"] == 1.0
    # Swapping the masks: matched by distance, so both land outside their matched mask.
    assert M.pointing_scores(pred, gt, size, masks=[mask_b, mask_a])["f1"] == 0.0


def test_pointing_edge_cases():
    size = [100, 100]
    assert M.pointing_scores("There are none.", [], size)["f1"] == 1.0
    assert M.pointing_scores(points_to_text([[5, 5]], "x", size), [], size)["f1"] == 0.0
    assert M.pointing_scores("There are none.", [[5, 5]], size)["f1"] == 0.0
    # Point tags wrapped in other text are malformed for Molmo's pointing eval.
    wrapped = count_to_text([[5, 5]], "x", size)
    assert M.pointing_scores(wrapped, [[5, 5]], size)["f1"] == 0.0
    assert M.is_valid_point_output(points_to_text([[5, 5]], "x", size))
    # Coordinates above 100% are invalid points and are dropped before matching.
    beyond = '<points x1="5.0" y1="5.0" x2="150.0" y2="5.0" alt="x">x</points>'
    assert M.pointing_scores(beyond, [[5, 5]], size) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


# ------------------------------------------------------------------ MMMU
def test_mmmu_multi_choice_parsing():
    options = ["apple", "banana", "cherry", "date"]
    assert M.mmmu_parse_multi_choice("(B)", options) == "B"
    assert M.mmmu_parse_multi_choice("The answer is C.", options) == "C"
    assert M.mmmu_parse_multi_choice("(A) is wrong, so the answer is (D)", options) == "D"  # last bracketed
    assert M.mmmu_parse_multi_choice("I am fairly sure it must be the cherry here", options) == "C"
    unparsed = M.mmmu_parse_multi_choice("?", options)
    assert unparsed in "ABCD" and unparsed == M.mmmu_parse_multi_choice("?", options)  # deterministic
    assert M.mmmu_score("(B)", "B", "multiple-choice", options) == 1.0
    assert M.mmmu_score("(B)", "A", "multiple-choice", options) == 0.0


def test_mmmu_open_parsing():
    assert 3000.0 in M.mmmu_parse_open("So the answer is 3,000.")
    assert M.mmmu_score("Therefore the result is 42.0", "42", "open") == 1.0
    assert M.mmmu_score("The speed is 12.346 m/s", ["12.35"], "open") == 1.0  # floats rounded to 2 places
    assert M.mmmu_score("the colour is blue", "Blue", "open") == 1.0
    assert M.mmmu_score("the colour is red", "blue", "open") == 0.0


# ------------------------------------------------------------------ MathVista
def test_math_vista_heuristic_extraction():
    assert M.math_vista_extract("The answer is 14.", "free_form", "integer") == "14"
    assert M.math_vista_extract("Total: 1,250 people", "free_form", "integer") == "1250"
    assert M.math_vista_extract("B: 8/11", "multi_choice", "text", ["3/11", "8/11"]) == "8/11"
    assert M.math_vista_extract("they peak at [2007, 2008]", "free_form", "list") == "[2007, 2008]"
    assert M.math_vista_score("So it is about 1.25", "1.2", "free_form", "float", precision=1) == 1.0
    assert M.math_vista_score("14", "15", "free_form", "integer") == 0.0
    assert M.math_vista_score("(B)", "8/11", "multi_choice", "text", ["3/11", "8/11"]) == 1.0
    # A choice text with a colon is kept as is (not read as the letter before the colon).
    choices = ["Ratio: 1/2", "Ratio: 3/4"]
    assert M.math_vista_normalize("Ratio: 3/4", "multi_choice", "text", choices) == "Ratio: 3/4"
    assert M.math_vista_normalize("(A) whatever", "multi_choice", "text", choices) == "Ratio: 1/2"
    assert M.math_vista_score("Answer: B", "Ratio: 3/4", "multi_choice", "text", choices) == 1.0


# ------------------------------------------------------------------ clocks
def test_clock_accuracy():
    assert M.clock_accuracy("3:05", "3:05") == 1.0
    assert M.clock_accuracy("The time is 15:05", "3:05") == 1.0  # a 12-hour dial
    assert M.clock_accuracy("12:58", "1:00") == 0.0
    assert M.clock_accuracy("12:58", "1:00", tolerance_minutes=3) == 1.0
    assert M.clock_accuracy("no idea", "1:00") == 0.0


def test_every_metric_returns_unit_interval():
    assert all(0.0 <= v <= 1.0 for v in (
        M.vqa_score("x", ["x"] * 5), M.anls("", [""]), M.relaxed_correctness("1", ["1"]),
        M.exact_match("", [""]), M.count_accuracy("", 0)))
