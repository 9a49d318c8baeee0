"""The Brownian path of adaptive reverse-SDE solves: diffrax's `VirtualBrownianTree` without its
host callback.

Rejected steps revisit parts of the path, so an adaptive SDE solve needs a path that gives the
same increment for the same interval every time: diffrax's virtual Brownian tree. Its `evaluate`
checks that each time lies in [t0, t1] with `eqx.error_if`, a host callback, and JAX's persistent
compilation cache cannot store a program that holds one. `UncheckedBrownianTree` wraps the tree
and evaluates it by the same descent (diffrax's own functions), with the time clipped into the
tree's range instead of checked: within the range (always, in a solve over the tree's own
interval) the values are the tree's, bit for bit (`tests/test_samplers.py`).

It uses diffrax internals (`_evaluate_leaf`, `_denormalise_bm_inc` and the Levy-area helpers of
`diffrax._brownian.tree`), pinned by the diffrax range in pyproject.toml.
"""

from __future__ import annotations

import diffrax
import diffrax._brownian.tree as diffrax_tree
import equinox as eqx
import equinox.internal as eqxi
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax._custom_types import levy_tree_transpose
from diffrax._misc import linear_rescale

__all__ = ["UncheckedBrownianTree"]


class UncheckedBrownianTree(diffrax.AbstractBrownianPath):
    """`tree`'s Brownian motion on [tree.t0, tree.t1], evaluated without a host callback."""

    tree: diffrax.VirtualBrownianTree
    t0: float
    t1: float
    levy_area: type = eqx.field(static=True)

    def __init__(self, tree: diffrax.VirtualBrownianTree):
        self.tree = tree
        self.t0 = tree.t0  # pyright: ignore[reportAttributeAccessIssue]
        self.t1 = tree.t1  # pyright: ignore[reportAttributeAccessIssue]
        self.levy_area = tree.levy_area

    def _at(self, t):
        """The tree's values at time t (diffrax's descent; t clipped into the range)."""
        tree = self.tree
        r = linear_rescale(tree.t0, eqxi.nondifferentiable(t, name="t"), tree.t1)
        r = jnp.clip(r, 0.0, 1.0)
        return jtu.tree_map(
            lambda key, shape: tree._evaluate_leaf(key, r, shape), tree.key, tree.shape
        )

    @eqx.filter_jit  # as diffrax's own `evaluate`: the same compiled arithmetic, eager or not
    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        del left
        shape = self.tree.shape
        if t1 is None:
            levy = jtu.tree_map(diffrax_tree._make_levy_val, shape, self._at(t0))
        else:
            levy = jtu.tree_map(diffrax_tree._levy_diff, shape, self._at(t0), self._at(t1))
        levy = self.tree._denormalise_bm_inc(levy_tree_transpose(shape, levy))
        return levy if use_levy else levy.W
