"""Intercept sites: what a forward pass captures, where it stops, and which sites it rewrites.

Axes: `B` batch, `T` sequence, `D` d_model.

A `Plan` is static (hashable, part of the compiled function's identity): the sites to capture, the
sites to edit with which function, and where to stop. The parameters of the edit functions are data:
a dict `site -> pytree of arrays` passed to the jitted forward as an argument, so changing a
steering strength or a dictionary's weights never recompiles.

Site names: `embed`, `blocks.{i}.{point}` with point in POINTS, `final`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from jaxinterp.errors import JaxinterpError

POINTS = ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")
"""Per-block sites, in the order the forward reaches them. mlp_in is the MLP's normalised input."""

EditFn = Callable[..., jax.Array]
"""`fn(x_btd, params, positions_bt) -> x_btd`: rewrites a site's value; `params` is the site's pytree
of arrays, `positions_bt` [B, T] the token positions (for edits confined to a window). An edit that
reads an earlier site (a transcoder's, which reads its input site and writes its target) is
`fn(x_btd, params, positions_bt, read_btd)`, with `read_btd` that site's value; an edit may read
several (earlier sites, or values derived at earlier sites), in the order it names them.

A derived value is computed at one site and kept for later edits of the same forward, without
changing the site: `(name, site, fn)` in `Plan.derive` stores `fn(x_btd, edit_params[name],
positions_bt)` under `name` (a cross-layer transcoder encodes each layer's features once, at its
input site, and every later mlp_out it writes to reads them)."""


HELD = "held"
"""Key of the frozen values in a linearised forward's edit parameters and captured values; names are
`blocks.{i}.{attn_norm, qk, post_attn_norm, mlp_norm, post_mlp_norm}` and `final_norm`."""


class SiteError(JaxinterpError):
    """A site name that does not exist in the model; the message lists what does."""


def site_names(n_layers: int) -> tuple[str, ...]:
    return ("embed", *(f"blocks.{i}.{p}" for i in range(n_layers) for p in POINTS), "final")


def parse_site(site: str, n_layers: int) -> tuple[int, str]:
    """(layer, point) of a site; `embed` is layer -1, `final` layer n_layers."""
    if site == "embed":
        return -1, "embed"
    if site == "final":
        return n_layers, "final"
    parts = site.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in POINTS:
        raise SiteError(
            f"site {site!r} not found; sites are 'embed', 'final' and 'blocks.{{i}}.{{point}}' "
            f"with point in {POINTS}"
        )
    layer = int(parts[1])
    if not 0 <= layer < n_layers:
        raise SiteError(f"site {site!r}: layer {layer} out of range; the model has layers 0..{n_layers - 1}")
    return layer, parts[2]


def _depth(site: str, n_layers: int) -> tuple[int, int]:
    layer, point = parse_site(site, n_layers)
    order = {"embed": -1, "final": len(POINTS), **{p: i for i, p in enumerate(POINTS)}}
    return layer, order[point]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one forward pass does at its intercept sites (static)."""

    capture: tuple[str, ...] = ()
    """Sites whose values are returned (after any edit at that site)."""
    edits: tuple[tuple, ...] = ()
    """(site, fn) pairs: the site's value x becomes fn(x, edit_params[site], positions); (site, fn,
    read, ...): fn(x, edit_params[site], positions, value of each read), each read a site or a
    derived value coming earlier in the forward."""
    stop_early: bool = False
    """Stop right after the deepest captured site: no logits, no compute beyond it."""
    derive: tuple[tuple[str, str, EditFn], ...] = ()
    """(name, site, fn): at `site`, after its edit, store fn(x, edit_params[name], positions) under
    `name` for later edits to read; the site's value is left as it is."""
    linearise: bool = False
    """Freeze the attention patterns and every norm's scale: each is computed (or taken from
    `edit_params[HELD][name]` when given there) and used under `stop_gradient`, and returned in
    `captured[HELD]`. With nothing given the forward's value is the model's and its derivatives are
    those of the model with patterns and norm scales frozen; with the values of another forward it
    is that frozen model evaluated here (attribution; the MLPs are frozen by edits at `mlp_out`)."""

    def validate(self, n_layers: int) -> None:
        for s in self.capture + tuple(e[0] for e in self.edits) + tuple(d[1] for d in self.derive):
            parse_site(s, n_layers)
        derived = {name: site for name, site, _ in self.derive}
        clash = [n for n in derived if n in site_names(n_layers)]
        if clash or len(derived) != len(self.derive):
            raise SiteError(f"derived values {[d[0] for d in self.derive]}: names must be unique and not site "
                            "names; rename them")
        for site, _, *reads in self.edits:
            for read in reads:
                where = derived.get(read, read)
                if _depth(where, n_layers) >= _depth(site, n_layers):
                    raise SiteError(f"an edit at {site!r} reads {read!r}, which the forward reaches at or after "
                                    "it; read a site (or a value derived at a site) that comes before the one edited")

    def deepest(self, n_layers: int) -> tuple[int, int] | None:
        if not self.capture:
            return None
        return max(_depth(s, n_layers) for s in self.capture)

    def last_layer(self, n_layers: int) -> int:
        """The last block the forward must run (n_layers means all, with the final norm)."""
        if not self.stop_early or not self.capture:
            return n_layers
        layer, _ = self.deepest(n_layers)
        return layer


class Recorder:
    """Applies a plan inside a forward pass (used while tracing; holds the captured values)."""

    def __init__(self, plan: Plan, edit_params: dict[str, Any] | None, positions_bt: jax.Array):
        self.plan = plan
        self.positions_bt = positions_bt
        self.edit_params = edit_params or {}
        self._edits = {e[0]: e[1:] for e in plan.edits}
        self._reads = {r for e in plan.edits for r in e[2:]}
        self._derive: dict[str, list[tuple[str, EditFn]]] = {}
        for name, site, fn in plan.derive:
            self._derive.setdefault(site, []).append((name, fn))
        self._capture = set(plan.capture)
        self.captured: dict[str, jax.Array] = {}
        self._read: dict[str, jax.Array] = {}
        self._given = self.edit_params.get(HELD) or {}
        self.held: dict[str, Any] = {}

    def hold(self, name: str):
        """What a value named `name` goes through in this forward: None (used as computed) unless the
        plan linearises; then the given value of that name if any, frozen, and kept in `held`."""
        if not self.plan.linearise:
            return None

        def fn(x):
            x = self._given.get(name, x)
            self.held[name] = x
            return jax.tree.map(jax.lax.stop_gradient, x)

        return fn

    def __call__(self, site: str, x: jax.Array) -> jax.Array:
        edit = self._edits.get(site)
        if edit is not None:
            fn, *read = edit
            x = fn(x, self.edit_params.get(site), self.positions_bt, *(self._read[r] for r in read))
        if site in self._reads:
            self._read[site] = x
        for name, fn in self._derive.get(site, ()):
            self._read[name] = fn(x, self.edit_params.get(name), self.positions_bt)
        if site in self._capture:
            self.captured[site] = x
        return x

    def done(self) -> bool:
        """True once every captured site has been recorded and the plan stops early."""
        return self.plan.stop_early and bool(self._capture) and self._capture <= set(self.captured)
