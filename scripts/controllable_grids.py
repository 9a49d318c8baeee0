"""Inpainting and class-conditional sample grids on the shipped digits model, with measured rates.

Run: python scripts/controllable_grids.py  (writes docs/img/inpaint-left.png and
docs/img/conditional.png, prints the clean classifier's accuracy on the results);
python scripts/controllable_grids.py --colour  (the colorization colour-match rate)
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import probflow as pf

OUT = Path(__file__).resolve().parents[1] / "docs" / "img"


def main() -> None:
    model, sde = pf.load_pretrained("digits-vp")
    test = pf.data.load("digits", "test")
    clf = pf.load_pretrained_classifier("digits-classifier")
    n = 100
    x = test.to_model_space()[:n]
    mask = np.zeros((8, 8, 1), np.float32)
    mask[:, :4] = 1.0
    r = pf.inpaint(model, sde, x, mask, key=jax.random.key(0), steps=500)
    res = jnp.clip(r.x, 0.0, 1.0)
    acc = float(jnp.mean(pf.classify(clf, res) == test.labels[:n]))
    blank = float(jnp.mean(pf.classify(clf, x * mask) == test.labels[:n]))
    print(f"inpainting (left half known, 500 PC steps, {n} test digits): clean classifier "
          f"accuracy {acc:.3f} (left half alone: {blank:.3f}, chance 0.1)")
    k = 12
    pf.save_image_grid(OUT / "inpaint-left.png", np.concatenate([x[:k], x[:k] * mask, res[:k]]),
                       ncol=k)

    noisy = pf.load_pretrained_classifier("digits-vp-classifier")
    labels = jnp.repeat(jnp.arange(10), 10)
    c = pf.sample_conditional(model, noisy, sde, labels, (8, 8, 1), key=jax.random.key(1),
                              scale=1.0, steps=500)
    samples = jnp.clip(c.x, 0.0, 1.0)
    rate = float(jnp.mean(pf.classify(clf, samples) == labels))
    print(f"class-conditional sampling (scale 1, 500 PC steps, 10 per class): clean classifier "
          f"agrees with the requested label for {rate:.3f}")
    # Columns are classes 0..9, rows are draws.
    grid = np.asarray(samples).reshape(10, 10, 8, 8, 1).transpose(1, 0, 2, 3, 4)
    grid = grid.reshape(100, 8, 8, 1)
    pf.save_image_grid(OUT / "conditional.png", grid, ncol=10)


if __name__ == "__main__" and "--colour" not in __import__("sys").argv:
    main()


def colour_match_rate(n: int = 100, steps: int = 500) -> float:
    """Colorize the grey versions of `n` colour-tinted test digits with the shipped colour model;
    the fraction whose dominant colour (nearest palette entry) is the original's."""
    from probflow.data._color import PALETTE

    model, sde = pf.load_pretrained("digits-color-vp")
    test = pf.data.load("digits-color", "test")
    x = np.asarray(test.to_model_space()[:n])
    gray = x.mean(-1, keepdims=True)
    r = pf.colorize(model, sde, gray, key=jax.random.key(2), steps=steps)
    pal = PALETTE / np.linalg.norm(PALETTE, axis=1, keepdims=True)

    def dominant(imgs):
        v = np.asarray(imgs).reshape(len(imgs), -1, 3).sum(1)
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        return np.argmax(v @ pal.T, axis=1)

    return float(np.mean(dominant(np.clip(r.x, 0, 1)) == dominant(x)))


if __name__ == "__main__" and "--colour" in __import__("sys").argv:
    print(f"colorization: dominant colour matches the original for {colour_match_rate():.3f} "
          f"(8 palette colours)")
