"""Train and ship the digits classifiers (python scripts/train_classifiers.py).

- `digits-classifier`: a clean-data MLP classifier on the digits train split. Its last hidden
  layer is the feature space of the Frechet distance in `probflow nfe-curve`, and it recognises
  inpainted digits.
- `digits-vp-classifier`: a noise-conditional classifier of x_t under the VP SDE, for
  class-conditional sampling (paper section 5, eq. 14).

Both train in a couple of minutes on 2 CPU cores and are written to probflow/pretrained/.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

import probflow as pf
import probflow.data as pdata
from probflow._classifier import (
    ClassifierConfig,
    classify,
    save_classifier,
    train_classifier,
)

OUT = Path(__file__).resolve().parents[1] / "probflow" / "pretrained"


def main() -> None:
    train = pdata.load("digits", "train")
    test = pdata.load("digits", "test")
    x_test = test.to_model_space()

    clean_cfg = ClassifierConfig(steps=3000, seed=0)
    clean = train_classifier(train.images, train.labels, num_bins=train.num_bins,
                             data_range=train.data_range, config=clean_cfg)
    acc = float((classify(clean, x_test) == test.labels).mean())
    print(f"digits-classifier: test accuracy {acc:.4f}")
    save_classifier(OUT / "digits-classifier.eqx", clean,
                    {"data": "digits", "test_accuracy": acc, "steps": clean_cfg.steps})

    sde = pf.VPSDE()
    noisy_cfg = ClassifierConfig(steps=10000, seed=1)
    noisy = train_classifier(train.images, train.labels, num_bins=train.num_bins,
                             data_range=train.data_range, sde=sde, config=noisy_cfg)
    accs = {}
    for t in (1e-3, 0.1, 0.3, 0.5):
        scale, std = sde.marginal(t)
        xt = scale * x_test + std * jax.random.normal(jax.random.key(0), x_test.shape)
        accs[str(t)] = float(jnp.mean(classify(noisy, xt, t) == test.labels))
    print(f"digits-vp-classifier: test accuracy by t {accs}")
    save_classifier(OUT / "digits-vp-classifier.eqx", noisy,
                    {"data": "digits", "sde": "vp", "test_accuracy_by_t": accs,
                     "steps": noisy_cfg.steps})


if __name__ == "__main__":
    main()
