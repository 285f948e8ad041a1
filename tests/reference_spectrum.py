"""A plain re-implementation of the reference Spectrum loop, for equivalence tests and benchmarks.

It does what cognitivecomputations/spectrum's ``spectrum.py`` does once its two interactive
questions are answered with "all weight types": load the whole model with transformers in float32,
walk ``named_modules()``, ``torch.linalg.svdvals`` each weight, score, sort per type (stable), and
keep ``int(count * percent / 100)``. No code from spectrum-sm is used.
"""

from __future__ import annotations

import math

import torch


def module_type(name: str) -> str:
    parts = name.split(".")
    index = next((i for i, p in enumerate(parts) if p.isdigit()), -1)
    return ".".join(parts[index + 1 :]) if index != -1 else name


def reference_snr(weight: torch.Tensor) -> float:
    w = weight.detach().float()
    if w.ndim < 2:
        w = w.unsqueeze(0)
    s = torch.linalg.svdvals(w)
    max_sv = s[0]
    sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    n, m = w.shape[-2:]
    beta = n / m if n < m else m / n
    threshold = sigma * math.sqrt((1 + math.sqrt(beta)) ** 2)
    signal_mask = s > threshold
    noise_mask = ~signal_mask
    signal = s[signal_mask].sum() if signal_mask.any() else torch.tensor(0.0)
    noise = s[noise_mask].sum() if noise_mask.any() else torch.tensor(1.0)
    snr = signal / noise if noise != 0 else float("inf")
    return float(snr / max_sv)


def reference_scan(model_dir: str) -> dict[str, dict]:
    """``{module: {"snr", "type"}}`` in ``named_modules()`` order, like the reference's JSON."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    results = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.ndim not in (1, 2):
                continue
            results[name] = {"snr": reference_snr(weight), "type": module_type(name)}
    return results


def reference_select(results: dict[str, dict], percent: float) -> dict[str, list[str]]:
    by_type: dict[str, list] = {}
    for name, info in results.items():
        by_type.setdefault(info["type"], []).append((name, info["snr"]))
    out = {}
    for layer_type, layers in by_type.items():
        ranked = sorted(layers, key=lambda x: x[1], reverse=True)
        out[layer_type] = [n for n, _ in ranked[: int(len(layers) * percent / 100)]]
    return out
