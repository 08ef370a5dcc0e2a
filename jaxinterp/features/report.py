"""What a dashboard, an explainer or an export needs to know of one feature, as plain values.

`FeatureReport` gathers a feature's corpus statistics, its example contexts (token strings with the
feature's activation on each) and its logit effects; everything here is JSON-able Python, so the
writers (static site, Neuronpedia batches, explainer prompts) need neither JAX nor the model.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple


class Example(NamedTuple):
    """One context window around a token where the feature fired."""

    tokens: tuple[str, ...]
    """The window's tokens as text, in order."""
    values: tuple[float, ...]
    """The feature's activation at each of them (0 where it does not fire)."""
    focus: int
    """Index into `tokens` of the token the example was chosen for."""
    location: int
    """That token's corpus location (`context * T + position`)."""

    @property
    def value(self) -> float:
        return self.values[self.focus]


class QuantileBin(NamedTuple):
    """Examples whose focus activation lies in [lo, hi]: one band of the feature's distribution."""

    lo: float
    hi: float
    examples: tuple[Example, ...]


@dataclasses.dataclass
class FeatureReport:
    index: int
    """The feature's id in its dictionary."""
    count: int
    """Tokens where it fired (activation > 0)."""
    n_tokens: int
    """Tokens seen."""
    mean: float
    """Mean activation over the tokens where it fired (0 if it never did)."""
    max: float
    """Largest activation seen."""
    hist: tuple[int, ...]
    """Firing values per bin of `hist_edges` (log10 of the activation)."""
    hist_edges: tuple[float, ...]
    top: tuple[Example, ...] = ()
    """The contexts of its largest activations, largest first."""
    quantiles: tuple[QuantileBin, ...] = ()
    """Random firing examples grouped by activation band, lowest band first."""
    pos_logits: tuple[tuple[str, float], ...] = ()
    """Tokens its decoder row promotes most through the unembedding, largest first."""
    neg_logits: tuple[tuple[str, float], ...] = ()
    """Tokens it suppresses most, most negative first."""
    logit_hist: tuple[tuple[int, ...], tuple[float, ...]] = ((), ())
    """(counts, bin edges) of its effect on every vocabulary token."""
    correlated: tuple[tuple[int, float, int], ...] = ()
    """(feature, Pearson correlation over every token, tokens where both fire) of the features it
    fires with, most correlated first."""

    @property
    def frac_nonzero(self) -> float:
        return self.count / self.n_tokens if self.n_tokens else 0.0
