"""Explainer prompts, reply parsing and detection/fuzzing scores against hand-counted confusion matrices."""

from __future__ import annotations

import re

import pytest

from jaxinterp.errors import UsageError
from jaxinterp.features.explain import (Sample, detection_messages, explain, explainer_messages, format_example,
                                        fuzzing_messages, fuzzing_samples, parse_answers, parse_explanation, score,
                                        tally)
from jaxinterp.features.report import Example


class ScriptedClient:
    """A stand-in chat model: records every prompt; answers from a list, in turn, or a function of the prompt."""

    def __init__(self, answer):
        self.answer = answer
        self.calls: list[list[dict]] = []

    def generate(self, messages: list[dict]) -> str:
        self.calls.append(messages)
        if callable(self.answer):
            return self.answer(messages)
        return self.answer[len(self.calls) - 1]


def example(tokens, values) -> Example:
    values = tuple(float(v) for v in values)
    return Example(tuple(tokens), values, focus=max(range(len(values)), key=values.__getitem__), location=0)


def shown_examples(messages: list[dict]) -> list[str]:
    """The example texts of a scorer prompt, in order."""
    return re.findall(r"^Example \d+: (.*)$", messages[-1]["content"], re.MULTILINE)


def marked_spans(text: str) -> list[str]:
    return re.findall(r"<<(.*?)>>", text)


SENTENCE = example(["The", " cat", " sat", " on", " the", " mat"], [0, 2, 3, 0, 0, 1])


def test_format_example_marks_firing_tokens_merging_runs():
    assert format_example(SENTENCE) == "The<< cat sat>> on the<< mat>>"
    assert format_example(SENTENCE, threshold=0.5) == "The<< cat sat>> on the mat"  # > 1.5 of max 3
    assert format_example(SENTENCE, mark=("[[", "]]")) == "The[[ cat sat]] on the[[ mat]]"
    assert format_example(example(["a", "b"], [0, 0])) == "ab"
    with pytest.raises(UsageError, match="threshold"):
        format_example(SENTENCE, threshold=1.0)
    with pytest.raises(UsageError, match="one value per token"):
        format_example(Example(("a", "b"), (1.0,), 0, 0))


def test_explainer_prompt_marks_exactly_the_activating_tokens_and_lists_values():
    second = example(["I", " love", " dogs", "!"], [0, 0, 4, 0])
    messages = explainer_messages([SENTENCE, second])
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "[EXPLANATION]:" in messages[0]["content"]
    lines = messages[1]["content"].strip().split("\n")
    assert lines[0] == "Example 1: The<< cat sat>> on the<< mat>>"
    assert marked_spans(lines[0]) == [" cat sat", " mat"]
    # values on delphi's 0-10 scale against the largest over all examples (4): ceil(10 v / 4)
    assert lines[1] == 'Activations: (" cat", 5), (" sat", 8), (" mat", 3)'
    assert lines[2] == "Example 2: I love<< dogs>>!"
    assert lines[3] == 'Activations: (" dogs", 10)'
    assert len(lines) == 4
    plain = explainer_messages([SENTENCE, second], activations=False)
    assert "Activations" not in plain[1]["content"] and "from 0 to 10" not in plain[0]["content"]
    assert plain[1]["content"].strip().split("\n") == [lines[0], lines[2]]
    with pytest.raises(UsageError, match="at least one example"):
        explainer_messages([])


def test_explainer_prompt_lists_at_most_max_listed_tokens():
    many = example([f" t{i}" for i in range(15)], range(1, 16))
    listing = explainer_messages([many], max_listed=10)[1]["content"].strip().split("\n")[1]
    assert listing.count("(") == 10


def test_parse_explanation_good_and_bad_replies():
    assert parse_explanation("[EXPLANATION]: Idioms conveying joy.") == "Idioms conveying joy."
    cot = "Step 1. the tokens...\nStep 3. write it using [EXPLANATION]:\n[EXPLANATION]:  The token \"er\".\n"
    assert parse_explanation(cot) == 'The token "er".'
    with pytest.raises(UsageError, match=r"no '\[EXPLANATION\]:' line: 'I think it is about cats'; check"):
        parse_explanation("I think it is about cats")
    with pytest.raises(UsageError, match="empty explanation"):
        parse_explanation("Thinking...\n[EXPLANATION]:   ")


def test_explain_sends_the_prompt_and_parses_the_reply():
    client = ScriptedClient(["Looking at it.\n[EXPLANATION]: Animals sitting."])
    assert explain(client, [SENTENCE], activations=False) == "Animals sitting."
    assert client.calls == [explainer_messages([SENTENCE], activations=False)]


def test_parse_answers_lists_and_errors():
    assert parse_answers("[1, 0, 1]", 3) == [True, False, True]
    assert parse_answers("Sure! [true, False]", 2) == [True, False]
    assert parse_answers("Example [2] is odd. ['yes', 'no']", 2) == [True, False]
    with pytest.raises(UsageError, match=r"has the lists \['1, 0'\], not a list of 3 answers"):
        parse_answers("[1, 0]", 3)
    with pytest.raises(UsageError, match=r"has no \[...\] list"):
        parse_answers("one, zero, one", 3)


def says_yes_if(word):
    """A scorer that answers 1 for exactly the examples whose shown text contains `word`."""
    return lambda messages: "[" + ", ".join("1" if word in text else "0" for text in shown_examples(messages)) + "]"


def words(text, value=0.0):
    toks = [" " + w for w in text.split()]
    return example(toks, [value if t == " cat" else 0.0 for t in toks])


def test_detection_score_equals_hand_counted_confusion():
    activating = [words("the cat sat", 1), words("a cat ran", 2), words("my cat", 3), example([" a", " dog"], [0, 1])]
    non_activating = [words("cat food"), words("the cat"), words("no pets"), words("a house"), words("it rains")]
    client = ScriptedClient(says_yes_if("cat"))
    s = score(client, "the word cat", activating, non_activating, method="detection", batch=4, seed=3)
    # activating: 3 mention cat (tp), 1 does not (fn); non-activating: 2 mention cat (fp), 3 do not (tn)
    assert (s.tp, s.fn, s.fp, s.tn, s.failed) == (3, 1, 2, 3, 0)
    assert s.accuracy == pytest.approx(6 / 9)
    assert s.balanced_accuracy == pytest.approx((3 / 4 + 3 / 5) / 2)
    assert s.precision == pytest.approx(3 / 5) and s.recall == pytest.approx(3 / 4)
    assert s.f1 == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    assert len(client.calls) == 3  # 9 examples, 4 a prompt
    for messages in client.calls:
        assert "Explanation: the word cat" in messages[-1]["content"]
        assert all("<<" not in text for text in shown_examples(messages))
    truth = {"".join(e.tokens): True for e in activating} | {"".join(e.tokens): False for e in non_activating}
    assert sorted(s.texts) == sorted(truth)
    assert list(s.labels) == [truth[t] for t in s.texts]
    assert list(s.predictions) == ["cat" in t for t in s.texts]
    assert s.texts != tuple(truth)  # shuffled


def test_fuzzing_score_equals_hand_counted_confusion():
    def marks_only_cats(messages):
        texts = shown_examples(messages)
        return str([int(all(span.strip() == "cat" for span in re.findall(r"<<(.*?)>>", t))) for t in texts])

    activating = [words("the cat sat", 1), words("a cat and a cat", 2), example([" my", " dog"], [0, 1])]
    # n_wrong = ceil((1 + 2 + 1) / 3) = 2 tokens marked at random on each decoy
    non_activating = [words("a big red house"), words("cat cat cat"), words("it rains all day")]
    client = ScriptedClient(marks_only_cats)
    s = score(client, "the word cat", activating, non_activating, method="fuzzing", batch=2, seed=0)
    # true marks: two examples mark only cats (tp), the dog one does not (fn);
    # decoys: the all-cat one can only get cats marked (fp), the others get other words (tn)
    assert (s.tp, s.fn, s.fp, s.tn, s.failed) == (2, 1, 1, 2, 0)
    assert s.accuracy == pytest.approx(4 / 6)
    assert s.balanced_accuracy == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert s.precision == pytest.approx(2 / 3) and s.f1 == pytest.approx(2 / 3)
    assert len(client.calls) == 3
    assert "<<" in client.calls[0][0]["content"]  # the fuzzing instructions describe the marks
    decoy_texts = [t for t, y in zip(s.texts, s.labels) if not y]
    assert all(sum(span.count(" ") for span in marked_spans(t)) == 2 for t in decoy_texts)


LETTERS = "abcdefghijklmnop"


def marked_positions(text: str) -> set[int]:
    return {LETTERS.index(c) for span in marked_spans(text) for c in span}


def test_fuzzing_marks_are_seeded_and_differ_from_the_true_marks():
    activating = [example(LETTERS, [1.0 if i in (3, 4, 9) else 0.0 for i in range(16)]) for _ in range(6)]
    blank = [example(LETTERS, [0.0] * 16) for _ in range(6)]
    first = fuzzing_samples(activating, blank, seed=0)
    assert first == fuzzing_samples(activating, blank, seed=0)
    assert first != fuzzing_samples(activating, blank, seed=1)
    assert [s.activating for s in first] == [True] * 6 + [False] * 6
    assert all(marked_positions(s.text) == {3, 4, 9} for s in first[:6])
    assert all(len(marked_positions(s.text)) == 3 for s in first[6:])  # ceil(mean 3 firing tokens)
    assert len({s.text for s in first[6:]}) > 1  # one stream across decoys, not one draw repeated
    # decoys="activating": the activating examples themselves, marked only where they do not fire
    misled = fuzzing_samples(activating, decoys="activating", seed=5)[6:]
    assert len(misled) == 6 and not any(s.activating for s in misled)
    assert all(len(marked_positions(s.text)) == 3 and not marked_positions(s.text) & {3, 4, 9} for s in misled)
    with pytest.raises(UsageError, match='decoys="activating"'):
        fuzzing_samples(activating, [])
    with pytest.raises(UsageError, match="not a kind of decoy"):
        fuzzing_samples(activating, blank, decoys="random")


def test_fuzzing_messages_show_the_sample_texts_numbered_from_zero():
    batch = [Sample("a<<b>>c", True), Sample("<<d>>ef", False)]
    messages = fuzzing_messages("letters", batch)
    assert shown_examples(messages) == ["a<<b>>c", "<<d>>ef"]
    assert "Example 0: a<<b>>c\nExample 1: <<d>>ef" in messages[-1]["content"]
    assert shown_examples(detection_messages("letters", batch)) == ["a<<b>>c", "<<d>>ef"]


def test_unparsed_batches_count_nowhere():
    activating, non_activating = [words("a cat", 1), words("the cat", 1)], [words("a dog"), words("the dog")]
    client = ScriptedClient(["[1, 1]", "I cannot tell."])
    s = score(client, "cats", activating, non_activating, batch=2, seed=0)
    assert s.failed == 2 and s.predictions[2:] == (None, None) and s.predictions[:2] == (True, True)
    answered = s.labels[:2]
    assert (s.tp, s.fp) == (sum(answered), 2 - sum(answered)) and s.tn == s.fn == 0


def test_metrics_in_degenerate_cases_follow_delphi():
    none_predicted = tally([False, False, False], [True, False, False])
    assert (none_predicted.precision, none_predicted.recall, none_predicted.f1) == (0.0, 0.0, 0.0)
    assert none_predicted.balanced_accuracy == pytest.approx((0 + 1) / 2)
    assert none_predicted.accuracy == pytest.approx(2 / 3)
    no_positives = tally([True, False], [False, False])
    assert no_positives.balanced_accuracy == pytest.approx((0 + 1 / 2) / 2)  # TPR of an empty class is 0
    assert tally([True, False], [True, True]).balanced_accuracy == pytest.approx((1 / 2 + 0) / 2)
    assert tally([None], [True]).accuracy == 0.0 and tally([None], [True]).failed == 1
    with pytest.raises(UsageError, match="one per example"):
        tally([True], [True, False])


def test_score_rejects_unknown_methods_and_batches():
    client = ScriptedClient(["[1]"])
    with pytest.raises(UsageError, match=r"method 'simulation'.*\('detection', 'fuzzing'\)"):
        score(client, "x", [SENTENCE], method="simulation")
    with pytest.raises(UsageError, match="batch 0"):
        score(client, "x", [SENTENCE], batch=0)


def test_chat_explainer_sends_the_prompt_to_an_openai_style_client_and_parses_its_reply():
    """The adapter's call has the shape of `openai.OpenAI().chat.completions.create`; the reply's
    content is the text explain() parses."""
    from types import SimpleNamespace

    from jaxinterp.features.explain import ChatExplainer

    sent = []

    def create(**kwargs):
        sent.append(kwargs)
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content="[EXPLANATION]: cats"))])

    client = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))
    explainer = ChatExplainer(client, "local-model", temperature=0.0, max_tokens=200)
    assert explain(explainer, [SENTENCE]) == "cats"
    assert sent[0]["model"] == "local-model" and sent[0]["temperature"] == 0.0 and sent[0]["max_tokens"] == 200
    assert sent[0]["messages"] == explainer_messages([SENTENCE])
