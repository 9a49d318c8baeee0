"""Simple density baselines for quantised images, in bits per dimension."""

from __future__ import annotations

import math

import numpy as np

from ._validate import check_num_bins
from .data._dataset import to_model_space


def gaussian_bpd(
    train_int, test_int, num_bins: int, *, seed: int = 0, repeats: int = 10
) -> float:
    """A full-covariance Gaussian fitted to uniformly dequantized training data.

    Both sets are dequantized to y = (x + u) / num_bins on [0, 1]; bpd = -(log N(y) - D log
    num_bins) / (D log 2), averaged over `repeats` draws of the test set's u.
    """
    rng = np.random.default_rng(seed)
    tr = np.asarray(train_int, np.float64).reshape(len(train_int), -1)
    te = np.asarray(test_int, np.float64).reshape(len(test_int), -1)
    d = tr.shape[1]
    y = to_model_space(tr, rng.random(tr.shape), num_bins, (0.0, 1.0))
    mean = y.mean(0)
    cov = np.cov(y, rowvar=False) + 1e-9 * np.eye(d)
    chol = np.linalg.cholesky(cov)
    logdet = 2 * np.log(np.diag(chol)).sum()
    out = []
    for _ in range(repeats):
        yt = to_model_space(te, rng.random(te.shape), num_bins, (0.0, 1.0))
        sol = np.linalg.solve(chol, (yt - mean).T)
        logp = -0.5 * (sol**2).sum(0) - 0.5 * logdet - 0.5 * d * math.log(2 * math.pi)
        out.append(-(logp - d * math.log(num_bins)) / (d * math.log(2)))
    return float(np.mean(out))


def categorical_bpd(train_int, test_int, num_bins: int, *, pseudocount: float = 1.0) -> float:
    """Independent per-pixel categoricals fitted by counting (with a pseudocount)."""
    num_bins = check_num_bins(num_bins)
    tr = np.asarray(train_int).reshape(len(train_int), -1)
    te = np.asarray(test_int).reshape(len(test_int), -1)
    d = tr.shape[1]
    counts = np.stack([np.bincount(tr[:, j], minlength=num_bins) for j in range(d)])
    probs = (counts + pseudocount) / (counts.sum(1, keepdims=True) + pseudocount * num_bins)
    logp = np.log2(probs[np.arange(d)[None, :], te]).sum(1)
    return float(np.mean(-logp / d))
