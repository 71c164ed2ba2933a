import numpy as np
import pytest

from molmo_fast.data.formatter import (
    DEMO_STYLES,
    LONG_CAPTION_PROMPTS,
    NO_POINTING_PREFIXES,
    POINT_COUNT_PROMPTS,
    POINTING_PROMPTS,
    Formatter,
    format_example,
    parse_points,
    points_to_text,
)


def test_chat_format_and_style_prefix():
    ex = {"id": "a", "style": "vqa2", "messages": ["What is this?", "a cat", "And color?", "black"]}
    assert format_example(ex) == [
        [" User: vqa2: What is this? Assistant:", " a cat", " User: And color? Assistant:", " black"]]
    assert format_example(ex, for_inference=True) == [[" User: vqa2: What is this? Assistant:", " a cat",
                                                       " User: And color? Assistant:"]]


@pytest.mark.parametrize("style,prefix", [("eval_short_answer", "vqa2: "), ("eval_multiple_choice", "a_okvqa_mc: "),
                                          ("android_control", ""), ("demo", ""), ("chart_qa", "chart_qa: ")])
def test_style_mapping(style, prefix):
    out = format_example({"id": "a", "style": style, "question": "Q?", "answers": ["x"]}, for_inference=True)
    assert out == [[f" User: {prefix}Q? Assistant:"]]


def test_demo_style_prefix_dropped_with_p09():
    ex = {"id": "a", "style": "user_qa", "messages": ["Tell me.", "Sure."]}
    assert format_example(ex)[0][0] == " User: Tell me. Assistant:"
    rng = np.random.default_rng(0)
    kept = [format_example(ex, rng)[0][0].startswith(" User: user_qa: ") for _ in range(2000)]
    assert 0.07 < np.mean(kept) < 0.13
    assert "user_qa" in DEMO_STYLES


def test_short_answer_uses_most_frequent_answer():
    ex = {"id": "a", "style": "vqa2", "question": "Q?", "answers": ["b", "a", "a", "c"]}
    assert format_example(ex) == [[" User: vqa2: Q? Assistant:", " a"]]


def test_multiple_choice_layout():
    ex = {"id": "a", "style": "a_okvqa_mc", "question": "Which?", "options": ["red", "blue", "green"], "answer_idx": 1}
    assert format_example(ex) == [[" User: a_okvqa_mc: Which?\nA: red\nB: blue\nC: green\n Assistant:", " B"]]


def test_no_pointing_prefix_for_how_many():
    ex = {"id": "a", "style": "user_qa", "messages": ["How many dogs?", "Three.", "What color?", "Brown."]}
    conv = format_example(ex)[0]
    assert conv[0] == f" User: {NO_POINTING_PREFIXES[0]}How many dogs? Assistant:"
    assert conv[2] == " User: What color? Assistant:"
    rng = np.random.default_rng(1)
    first = {format_example(ex, rng)[0][0] for _ in range(50)}
    assert any(p in s for s in first for p in NO_POINTING_PREFIXES[1:])


def test_points_to_text():
    size = [200, 100]  # width, height
    assert points_to_text([], "dog", size) == "There are none."
    assert points_to_text([[50, 25]], "dog", size) == '<point x="25.0" y="25.0" alt="dog">dog</point>'
    text = points_to_text([[150, 10], [20, 80], [20, 30]], "dog", size)
    assert text == '<points x1="10.0" y1="30.0" x2="10.0" y2="80.0" x3="75.0" y3="10.0" alt="dog">dog</points>'
    assert points_to_text([[33.333, 66.666]], "x", [100, 100]) == '<point x="33.3" y="66.7" alt="x">x</point>'


def test_parse_points_inverts_points_to_text():
    size = [640, 480]
    pts = [[100.0, 200.0], [320.0, 50.0], [600.0, 470.0]]
    text = "Sure. " + points_to_text(pts, "car", size)
    assert np.allclose(parse_points(text, size), pts, atol=0.5)
    assert parse_points(points_to_text(pts[:1], "car", None)) == [(100.0, 200.0)]
    both = '<point x="1.5" y="2.5" alt="a">a</point> and <points x1="3" y1="4" x2="5" y2="6">b</points>'
    assert parse_points(both) == [(1.5, 2.5), (3.0, 4.0), (5.0, 6.0)]
    assert parse_points("There are none.") == []
    assert parse_points('<point x="oops" y="1">') == []


def test_pointing_and_counting_examples():
    ex = {"id": "p", "style": "pointing", "points": [[10, 10], [30, 20]], "label": "Red Car", "image_size": [100, 100]}
    user, answer = format_example(ex)[0]
    assert user == f" User: {POINTING_PROMPTS[0].format(label='red car')} Assistant:"
    assert answer == ' <points x1="10.0" y1="10.0" x2="30.0" y2="20.0" alt="Red Car">Red Car</points>'
    ex = dict(ex, style="point_count", count=2)
    user, answer = format_example(ex)[0]
    assert user == f" User: {POINT_COUNT_PROMPTS[0].format(label='red car')} Assistant:"
    assert answer.startswith(" Counting the <points x1=") and answer.endswith("</points> shows a total of 2.")
    assert format_example(dict(ex, points=[], count=0))[0][1] == " There are none."
    rng = np.random.default_rng(0)
    prompts = {format_example(ex, rng)[0][0] for _ in range(100)}
    assert len(prompts) > 1 and all("red car" in p for p in prompts)


def test_caption_chat_and_captioner_format():
    caption = "A long caption. " * 20
    ex = {"id": "c", "style": "long_caption", "caption": caption}
    assert format_example(ex) == [[f" User: {LONG_CAPTION_PROMPTS[0]} Assistant:", f" {caption}"]]
    cap = Formatter(kind="captioner")
    assert cap(ex, for_inference=True) == [[" long_caption 65:"]]
    assert cap(ex) == [[f" long_caption {len(caption) // 15}:", f" {caption}"]]
    rng = np.random.default_rng(0)
    hints = [cap(ex, rng)[0][0] for _ in range(1000)]
    no_len = np.mean([h == " long_caption :" for h in hints])
    assert 0.06 < no_len < 0.14
    lengths = [int(h.split()[1][:-1]) for h in hints if h != " long_caption :"]
    assert len(set(lengths)) > 3 and abs(np.mean(lengths) - len(caption) / 15) < 2
    with pytest.raises(ValueError, match="captioner"):
        cap({"id": "x", "style": "vqa2", "question": "q"})


def test_message_list_and_validation():
    ex = {"id": "m", "style": "vqa2", "message_list": [["q1", "a1"], ["q2", "a2"], ["q3", "a3"]]}
    out = format_example(ex)
    assert [c[1] for c in out] == [" a1", " a2", " a3"] and all(c[0].startswith(" User: vqa2: q") for c in out)
    rng = np.random.default_rng(3)
    orders = {tuple(c[1] for c in format_example(ex, rng)) for _ in range(20)}
    assert len(orders) > 1
    with pytest.raises(ValueError, match="pairs"):
        format_example({"id": "x", "style": "vqa2", "messages": ["q"]})
    with pytest.raises(ValueError, match="no content"):
        format_example({"id": "x", "style": "vqa2"})
