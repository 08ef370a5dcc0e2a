"""Explanations of features by a language model the user supplies, and their detection and fuzzing scores.

The definitions follow delphi (EleutherAI/delphi: `explainers/`, `scorers/classifier/`,
`log/result_analysis.py`).

- Marks. A token of an example is *active* when its value exceeds `threshold * max(values)`, the
  example's own largest value (none is active when that is <= 0). Each run of consecutive active
  tokens is wrapped in one pair of marks: `the <<cows come>> home`. delphi's threshold is 0.3; the
  default here, 0, marks every token where the feature fires.
- Explaining. The model reads the top examples with their active tokens marked and, with
  `activations=True` (delphi's default), after each example its first 10 active tokens with their
  values on delphi's 0-10 scale, `clip(ceil(10 * value / top), 0, 10)`, `top` the largest value over
  all the examples. It must end its reply with `[EXPLANATION]: ...`; the explanation is the text after
  the last such marker.
- Detection. A scorer model reads the explanation and batches of `batch` unmarked examples (the
  activating and the non-activating ones, shuffled together) and answers with a Python list, 1 for
  each example it thinks the feature fires on.
- Fuzzing. Every example is shown marked: activating ones with their true marks; decoys with
  `n_wrong` tokens marked that are not active, drawn uniformly from `seed`, where `n_wrong` is the
  mean number of firing tokens per activating example, rounded up. Decoys are the non-activating
  examples (`decoys="non_activating"`, delphi's "default") or the activating examples themselves
  (`"activating"`, delphi's "active"); a decoy with no inactive token is left out. The scorer answers
  1 for each example whose marked tokens all fit the explanation.
- Scores. The answer is the first `[...]` list of 0/1 (or true/false, yes/no) of the right length in
  the reply; a batch whose reply has none counts nowhere (`Score.failed`). Over the rest, P activating
  and N non-activating examples:
      accuracy          = (tp + tn) / (P + N)
      balanced_accuracy = (tp / P + tn / N) / 2        a term is 0 when its class is empty
      precision         = tp / (tp + fp)               0 when nothing is predicted active
      recall            = tp / P                       0 when P = 0
      f1                = 2 precision recall / (precision + recall), 0 when both are 0
  delphi reports `balanced_accuracy` under the name "accuracy".
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np

from jaxinterp.errors import UsageError
from jaxinterp.features.report import Example

MARK = ("<<", ">>")
METHODS = ("detection", "fuzzing")
DECOYS = ("non_activating", "activating")


class Explainer(Protocol):
    """A chat model: OpenAI-style messages (`{"role", "content"}` dicts) in, the reply's text out."""

    def generate(self, messages: list[dict]) -> str: ...


class ChatExplainer:
    """An `Explainer` over an OpenAI-style client (`openai.OpenAI(base_url=...)`, or any object with
    `chat.completions.create(model=, messages=, **options)` returning `choices[0].message.content`),
    e.g. a local server; jaxinterp bundles no model and no client."""

    def __init__(self, client, model: str, **options):
        self.client, self.model, self.options = client, model, options

    def generate(self, messages: list[dict]) -> str:
        reply = self.client.chat.completions.create(model=self.model, messages=messages, **self.options)
        return reply.choices[0].message.content or ""


class Sample(NamedTuple):
    """One example as a scorer is shown it."""

    text: str
    """The example's text, marked (fuzzing) or not (detection)."""
    activating: bool
    """The truth: an activating example (with its true marks), not a non-activating one or a decoy."""


class Score(NamedTuple):
    """How well a scorer, reading an explanation, told activating examples from the others."""

    tp: int
    """Activating examples answered 1."""
    tn: int
    """Non-activating examples (or decoys) answered 0."""
    fp: int
    """Non-activating examples (or decoys) answered 1."""
    fn: int
    """Activating examples answered 0."""
    accuracy: float
    """(tp + tn) / answered."""
    balanced_accuracy: float
    """(TPR + TNR) / 2, a rate taken as 0 when its class is empty."""
    precision: float
    """tp / (tp + fp); 0 when nothing was answered 1."""
    recall: float
    """tp / (tp + fn); 0 when no activating example was answered."""
    f1: float
    """2 precision recall / (precision + recall); 0 when both are 0."""
    predictions: tuple[bool | None, ...]
    """The answer for each example, in the order shown; None where its batch's reply had no answer."""
    labels: tuple[bool, ...]
    """The truth for each example, in the same order."""
    texts: tuple[str, ...]
    """Each example as it was shown."""
    failed: int
    """Examples whose batch's reply could not be parsed (counted in no field above)."""


def _check_example(example: Example) -> None:
    if len(example.tokens) != len(example.values):
        raise UsageError(f"example has {len(example.tokens)} tokens but {len(example.values)} values; "
                         "give one value per token")


def active_mask(values: Sequence[float], threshold: float = 0.0) -> list[bool]:
    """Which tokens are active: value > `threshold` * the largest value (a fraction in [0, 1))."""
    if not 0.0 <= threshold < 1.0:
        raise UsageError(f"threshold {threshold!r} is a fraction of the example's largest value; use 0 <= threshold < 1")
    top = max(values, default=0.0)
    return [top > 0 and v > threshold * top for v in values]


def mark_tokens(tokens: Sequence[str], marked: Sequence[bool], mark: tuple[str, str] = MARK) -> str:
    """The tokens joined, each run of consecutive marked ones wrapped in one pair of `mark`."""
    parts = []
    for on, run in itertools.groupby(zip(tokens, marked), key=lambda pair: bool(pair[1])):
        text = "".join(token for token, _ in run)
        parts.append(f"{mark[0]}{text}{mark[1]}" if on else text)
    return "".join(parts)


def format_example(example: Example, threshold: float = 0.0, mark: tuple[str, str] = MARK) -> str:
    """The example's text with its active tokens marked, consecutive ones as one span."""
    _check_example(example)
    return mark_tokens(example.tokens, active_mask(example.values, threshold), mark)


def _value_list(example: Example, threshold: float, top: float, max_listed: int) -> str:
    active = active_mask(example.values, threshold)
    listed = [(tok, min(10, max(0, math.ceil(10 * v / top))))
              for tok, v, on in zip(example.tokens, example.values, active) if on][:max_listed]
    return "Activations: " + ", ".join(f"({json.dumps(tok, ensure_ascii=False)}, {n})" for tok, n in listed)


def explainer_messages(examples: Sequence[Example], *, threshold: float = 0.0, activations: bool = True,
                       mark: tuple[str, str] = MARK, max_listed: int = 10) -> list[dict]:
    """The explainer's prompt (system, user) for a feature's top `examples`, active tokens marked."""
    if not examples:
        raise UsageError("explainer_messages needs at least one example; pass the feature's top examples "
                         "(FeatureReport.top)")
    left, right = mark
    values_note = (" After each example, its marked tokens are listed with how strongly each one fires, "
                   "from 0 to 10." if activations else "")
    system = (
        "You are a careful AI researcher studying patterns in language. Each example below is a piece of "
        f"text in which some tokens are marked, {left}like this{right}; a run of consecutive marked tokens is "
        f"marked as one span, {left}like this one{right}.{values_note}\n\n"
        "- Say, concisely, what the marked tokens and their contexts have in common.\n"
        "- Skip examples that tell you nothing; do not list the marked tokens one by one.\n"
        f"- Do not mention the marks ({left} {right}) in your explanation.\n"
        "- Give one explanation, not a list of candidates.\n"
        "- The last line of your reply must be the explanation, written as\n"
        "[EXPLANATION]: <your explanation>")
    top = max(1e-6, max(max(e.values, default=0.0) for e in examples))
    lines = []
    for i, example in enumerate(examples, 1):
        lines.append(f"Example {i}: {format_example(example, threshold, mark)}")
        if activations:
            lines.append(_value_list(example, threshold, top, max_listed))
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(lines) + "\n"}]


def parse_explanation(text: str) -> str:
    """The explanation in an explainer's reply: the text after its last `[EXPLANATION]:`."""
    found = list(re.finditer(r"\[EXPLANATION\]\s*:", text, re.IGNORECASE))
    explanation = text[found[-1].end():].strip() if found else ""
    if not explanation:
        what = "an empty explanation after" if found else "no"
        raise UsageError(f"the explainer's reply has {what} '[EXPLANATION]:' line: {text[-200:]!r}; check that "
                         "generate() returns the reply's text, and raise the client's max_tokens if it was cut off")
    return explanation


def explain(explainer: Explainer, examples: Sequence[Example], **prompt_options) -> str:
    """An explanation of the feature whose top `examples` these are, by `explainer`;
    `prompt_options` go to `explainer_messages`."""
    return parse_explanation(explainer.generate(explainer_messages(examples, **prompt_options)))


def _scorer_messages(system: str, explanation: str, batch: Sequence[Sample]) -> list[dict]:
    shown = "\n".join(f"Example {i}: {sample.text}" for i, sample in enumerate(batch))
    user = f"Explanation: {explanation}\n\nExamples:\n\n{shown}\n"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


_ANSWER_FORMAT = "Reply with a Python list of one 0 or 1 per example, in order, such as [1, 0, 1], and nothing else."


def detection_messages(explanation: str, batch: Sequence[Sample]) -> list[dict]:
    """The detection prompt: does the feature, as explained, fire on each (unmarked) example?"""
    system = ("You are a careful linguistics researcher. You are given an explanation of a feature of text, "
              "such as \"male pronouns\" or \"text with negative sentiment\", and text examples numbered from 0. "
              "For each example, answer 1 if the feature as explained is present in it and 0 if it is not. "
              + _ANSWER_FORMAT)
    return _scorer_messages(system, explanation, batch)


def fuzzing_messages(explanation: str, batch: Sequence[Sample], mark: tuple[str, str] = MARK) -> list[dict]:
    """The fuzzing prompt: are the marked tokens of each example the ones the explanation describes?"""
    left, right = mark
    system = ("You are a careful linguistics researcher. You are given an explanation of a feature of text, "
              "such as \"male pronouns\" or \"text with negative sentiment\", and text examples numbered from 0, "
              f"in which some tokens are marked, {left}like this{right}. Some examples are marked wrongly: any, "
              "all or none of them may be. An example is marked correctly only if every marked token is one the "
              "explanation describes. For each example, answer 1 if it is marked correctly and 0 if it is not. "
              + _ANSWER_FORMAT)
    return _scorer_messages(system, explanation, batch)


_YES, _NO = {"1", "true", "yes"}, {"0", "false", "no"}


def parse_answers(text: str, n: int) -> list[bool]:
    """The scorer's `n` answers: the first `[...]` list in `text` of n items each 0/1, true/false or yes/no."""
    lists = [m.group(1) for m in re.finditer(r"\[([^\[\]]*)\]", text)]
    for body in lists:
        items = [s.strip().strip("'\"").lower() for s in body.split(",")] if body.strip() else []
        if items and all(s in _YES | _NO for s in items) and len(items) == n:
            return [s in _YES for s in items]
    found = f"the lists {lists!r}" if lists else "no [...] list"
    raise UsageError(f"the scorer's reply {text[:200]!r} has {found}, not a list of {n} answers 0 or 1; the "
                     "prompt asks for one: check generate() returns the reply's text, or show fewer examples a batch")


def detection_samples(activating: Sequence[Example], non_activating: Sequence[Example]) -> list[Sample]:
    """The examples as detection shows them: unmarked, activating ones first."""
    return ([Sample("".join(e.tokens), True) for e in activating]
            + [Sample("".join(e.tokens), False) for e in non_activating])


def fuzzing_samples(activating: Sequence[Example], non_activating: Sequence[Example] = (), *,
                    decoys: str = "non_activating", threshold: float = 0.0, seed: int = 0,
                    mark: tuple[str, str] = MARK) -> list[Sample]:
    """The examples as fuzzing shows them: the activating ones truly marked, then the decoys
    (`decoys`: "non_activating" or "activating") with `n_wrong` inactive tokens marked at random."""
    if decoys not in DECOYS:
        raise UsageError(f"decoys {decoys!r} is not a kind of decoy; use one of {DECOYS}")
    if not activating:
        raise UsageError("fuzzing needs activating examples: the true marks set how many tokens decoys get")
    pool = non_activating if decoys == "non_activating" else activating
    if not pool:
        raise UsageError('decoys="non_activating" needs non-activating examples; pass some, '
                         'or use decoys="activating" (mis-marked activating examples)')
    n_wrong = math.ceil(sum(sum(v > 0 for v in e.values) for e in activating) / len(activating))
    rng = np.random.default_rng(seed)
    samples = [Sample(format_example(e, threshold, mark), True) for e in activating]
    for example in pool:
        _check_example(example)
        inactive = [i for i, on in enumerate(active_mask(example.values, threshold)) if not on]
        if not inactive:
            continue
        chosen = set(rng.choice(inactive, size=min(n_wrong, len(inactive)), replace=False).tolist())
        marked = [i in chosen for i in range(len(example.tokens))]
        samples.append(Sample(mark_tokens(example.tokens, marked, mark), False))
    return samples


def tally(predictions: Sequence[bool | None], labels: Sequence[bool], texts: Sequence[str] = ()) -> Score:
    """The confusion matrix and delphi's metrics of `predictions` against `labels` (None: unanswered)."""
    if len(predictions) != len(labels):
        raise UsageError(f"{len(predictions)} predictions for {len(labels)} labels; give one per example")
    answered = [(bool(p), bool(y)) for p, y in zip(predictions, labels) if p is not None]
    tp = sum(p and y for p, y in answered)
    tn = sum(not p and not y for p, y in answered)
    fp = sum(p and not y for p, y in answered)
    fn = sum(not p and y for p, y in answered)
    pos, neg = tp + fn, tn + fp
    tpr, tnr = (tp / pos if pos else 0.0), (tn / neg if neg else 0.0)
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * precision * tpr / (precision + tpr) if precision + tpr else 0.0
    return Score(tp=tp, tn=tn, fp=fp, fn=fn, accuracy=(tp + tn) / (pos + neg) if pos + neg else 0.0,
                 balanced_accuracy=(tpr + tnr) / 2, precision=precision, recall=tpr, f1=f1,
                 predictions=tuple(predictions), labels=tuple(bool(y) for y in labels), texts=tuple(texts),
                 failed=len(predictions) - len(answered))


def score(explainer: Explainer, explanation: str, activating: Sequence[Example],
          non_activating: Sequence[Example] = (), *, method: str = "detection", batch: int = 5, seed: int = 0,
          threshold: float = 0.0, decoys: str = "non_activating", mark: tuple[str, str] = MARK) -> Score:
    """How well `explainer` (the scoring model), reading `explanation`, tells `activating` examples
    from the others by `method` ("detection" or "fuzzing"), `batch` examples a prompt, shuffled from `seed`."""
    if batch < 1:
        raise UsageError(f"batch {batch!r} is the number of examples a prompt shows; use 1 or more (delphi uses 5)")
    if method == "detection":
        samples, build = detection_samples(activating, non_activating), detection_messages
    elif method == "fuzzing":
        samples = fuzzing_samples(activating, non_activating, decoys=decoys, threshold=threshold, seed=seed,
                                  mark=mark)
        build = functools.partial(fuzzing_messages, mark=mark)
    else:
        raise UsageError(f"method {method!r} is not a scoring method; use one of {METHODS}")
    order = np.random.default_rng([seed, 1]).permutation(len(samples))
    samples = [samples[i] for i in order]
    predictions: list[bool | None] = []
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        reply = explainer.generate(build(explanation, chunk))
        try:
            predictions += parse_answers(reply, len(chunk))
        except UsageError:
            predictions += [None] * len(chunk)
    return tally(predictions, [s.activating for s in samples], [s.text for s in samples])
