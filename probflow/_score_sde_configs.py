"""The fields of the paper's config files (score_sde / score_sde_pytorch `configs/`) that define
its networks and SDEs, as data: every `*_continuous` config. `scripts/make_score_sde_fixtures.py`
checks this table against the reference's own config files."""

from __future__ import annotations

import copy

# configs/default_{cifar10,celeba,lsun}_configs.py and the model fields shared by the NCSN++ files.
_SDE_PARAMS = {"sigma_min": 0.01, "beta_min": 0.1, "beta_max": 20.0}
_NCSNPP = {
    "name": "ncsnpp", "nf": 128, "ch_mult": (1, 2, 2, 2), "num_res_blocks": 4,
    "attn_resolutions": (16,), "dropout": 0.1, "resamp_with_conv": True, "conditional": True,
    "fir": True, "fir_kernel": (1, 3, 3, 1), "skip_rescale": True, "resblock_type": "biggan",
    "progressive": "none", "progressive_input": "residual", "progressive_combine": "sum",
    "embedding_type": "positional", "fourier_scale": 16, "init_scale": 0.0, "conv_size": 3,
    "scale_by_sigma": False, "nonlinearity": "swish", "normalization": "GroupNorm",
    "sigma_max": 50, "num_scales": 1000, **_SDE_PARAMS,
}
_DDPMPP = {**_NCSNPP, "fir": False, "progressive_input": "none", "ema_rate": 0.9999}
_NCSNPP_VP = {**_NCSNPP, "ema_rate": 0.9999}
_NCSNPP_VE = {**_NCSNPP, "embedding_type": "fourier", "scale_by_sigma": True, "ema_rate": 0.999}
# models/ddpm.py reads no fir/progressive/embedding field (the defaults' embedding_type
# 'fourier' is unused: DDPM always embeds positionally).
_DDPM = {
    "name": "ddpm", "nf": 128, "ch_mult": (1, 2, 2, 2), "num_res_blocks": 2,
    "attn_resolutions": (16,), "dropout": 0.1, "resamp_with_conv": True, "conditional": True,
    "embedding_type": "fourier", "scale_by_sigma": False, "nonlinearity": "swish",
    "normalization": "GroupNorm", "sigma_max": 50, "num_scales": 1000, "ema_rate": 0.9999,
    **_SDE_PARAMS,
}
_HIGH_RES = {
    **_NCSNPP_VE, "ch_mult": (1, 1, 2, 2, 2, 2, 2), "num_res_blocks": 2, "dropout": 0.0,
    "progressive": "output_skip", "progressive_input": "input_skip", "num_scales": 2000,
}
_HIGH_RES_1024 = {
    **{k: v for k, v in _HIGH_RES.items() if k not in ("beta_min", "beta_max")},
    "nf": 16, "ch_mult": (1, 2, 4, 8, 16, 32, 32, 32), "num_res_blocks": 1, "sigma_max": 1348,
    "ema_rate": 0.9999,
}


def _cfg(sde, dataset, image_size, centered, model):
    return {
        "model": model,
        "data": {"dataset": dataset, "image_size": image_size, "num_channels": 3,
                 "centered": centered},
        "training": {"sde": sde, "continuous": True},
    }


def _cifar10(sde, model):
    return _cfg(sde, "CIFAR10", 32, sde != "vesde", model)


_DEEP = {"num_res_blocks": 8}

#: Every `*_continuous` config of the paper's code, by its path under configs/ without ".py".
SCORE_SDE_CONFIGS: dict[str, dict] = {
    "vp/ddpm/cifar10_continuous": _cifar10("vpsde", _DDPM),
    "vp/cifar10_ddpmpp_continuous": _cifar10("vpsde", _DDPMPP),
    "vp/cifar10_ddpmpp_deep_continuous": _cifar10("vpsde", {**_DDPMPP, **_DEEP}),
    "vp/cifar10_ncsnpp_continuous": _cifar10("vpsde", _NCSNPP_VP),
    "vp/cifar10_ncsnpp_deep_continuous": _cifar10("vpsde", {**_NCSNPP_VP, **_DEEP}),
    "subvp/cifar10_ddpm_continuous": _cifar10("subvpsde", _DDPM),
    "subvp/cifar10_ddpmpp_continuous": _cifar10("subvpsde", _DDPMPP),
    "subvp/cifar10_ddpmpp_deep_continuous": _cifar10("subvpsde", {**_DDPMPP, **_DEEP}),
    "subvp/cifar10_ncsnpp_continuous": _cifar10("subvpsde", _NCSNPP_VP),
    "subvp/cifar10_ncsnpp_deep_continuous": _cifar10("subvpsde", {**_NCSNPP_VP, **_DEEP}),
    "ve/cifar10_ncsnpp_continuous": _cifar10("vesde", _NCSNPP_VE),
    "ve/cifar10_ncsnpp_deep_continuous": _cifar10("vesde", {**_NCSNPP_VE, **_DEEP}),
    "ve/celebahq_256_ncsnpp_continuous": _cfg(
        "vesde", "CelebAHQ", 256, False, {**_HIGH_RES, "sigma_max": 348}),
    "ve/ffhq_256_ncsnpp_continuous": _cfg(
        "vesde", "FFHQ", 256, False, {**_HIGH_RES, "sigma_max": 348}),
    "ve/bedroom_ncsnpp_continuous": _cfg(
        "vesde", "LSUN", 256, False, {**_HIGH_RES, "sigma_max": 378}),
    "ve/church_ncsnpp_continuous": _cfg(
        "vesde", "LSUN", 256, False, {**_HIGH_RES, "sigma_max": 380}),
    "ve/celebahq_ncsnpp_continuous": _cfg("vesde", "CelebAHQ", 1024, False, _HIGH_RES_1024),
    "ve/ffhq_ncsnpp_continuous": _cfg("vesde", "FFHQ", 1024, False, _HIGH_RES_1024),
}


def score_sde_config(name: str) -> dict:
    """A copy of the named config's `model`/`data`/`training` fields (edit it and pass it as
    `load_score_sde(path, config=...)` for a checkpoint trained with an edited config).

    **Arguments:**

    - `name`: the paper's config name, its path under configs/ without ".py".
    """
    if name not in SCORE_SDE_CONFIGS:
        raise ValueError(
            f"config: unknown config {name!r}; known: {', '.join(SCORE_SDE_CONFIGS)}"
        )
    return copy.deepcopy(SCORE_SDE_CONFIGS[name])
