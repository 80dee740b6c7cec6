"""Classifier-free guidance over condition subsets, as a wrapper around a denoiser, in one batched forward.

    guided = Guidance(denoiser, scale=3.0, away_from=["caption"])      # bidirectional (Composer, eq. 2)
    guided = Guidance(denoiser, weights={"sketch": 2.0, "palette": 1.5})  # per-condition weights
    prediction = guided(x_t, t, conditions)

pred = pred(x_t, c1) + w * (pred(x_t, c2) - pred(x_t, c1)), c2 = every condition given, c1 = ``away_from``
(empty by default); with per-condition weights pred = pred(empty) + sum_i w_i (pred(c_i) - pred(empty)).
``anchor`` names conditions held in every branch (c1 too) and so never guided: in region edits the
pipeline anchors ``masking``, since guiding away from the known pixels pushes the fill away from its
surroundings (as in SD-inpainting and Composer, whose unconditional branch keeps the masked image).
Both are affine combinations (their weights sum to 1), so guiding eps, v or x0 predictions gives the same
result: guidance works on whatever the denoiser predicts.

``rescale`` (phi, diffusers' ``guidance_rescale``; Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
Steps are Flawed", sec. 3.4, algorithm 2) pulls the guided prediction's per-sample standard deviation back
towards the conditional one's: pred <- phi * pred * std(pred(c2)) / std(pred) + (1 - phi) * pred. Strong
guidance inflates that spread, which shows as over-saturated, over-contrasted samples, most when the given
conditions already fix the image (every condition at once). Unlike the guidance itself it is not affine, so its
result depends on the parameterisation: like the paper's v-prediction models, it acts on what the denoiser
predicts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from composer.conditions import Conditions

Predictor = Callable[[torch.Tensor, torch.Tensor, Conditions], torch.Tensor]


def _per_sample(timestep, sample: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(timestep, device=sample.device).reshape(-1)
    return t.expand(sample.shape[0]) if t.numel() == 1 else t


def only(conditions: Conditions, names: Iterable[str]) -> Conditions:
    """The same batch with only ``names`` kept (others present but dropped, so batches can be concatenated)."""
    names = set(names)
    keep = {n: conditions.keep(n) & (n in names) for n in conditions.values}
    return Conditions(dict(conditions.values), keep, conditions.batch_size)


def check_rescale(value: float, name: str = "guidance_rescale") -> float:
    """``value`` as a float if it is a valid rescale phi (0 to 1), else one clear ValueError naming ``name``."""
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be between 0 and 1 (0: off; Lin et al. use 0.7), got {value}")
    return value


def rescaled(guided: torch.Tensor, conditional: torch.Tensor, rescale: float) -> torch.Tensor:
    """Lin et al. 2024, algorithm 2: ``guided`` (B, ...) with its per-sample std moved a fraction ``rescale`` of the
    way to that of ``conditional`` (0: unchanged, 1: equal)."""
    if rescale == 0.0:
        return guided
    dims = tuple(range(1, guided.ndim))
    ratio = conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
    return rescale * guided * ratio + (1.0 - rescale) * guided


def guided_prediction(model: Predictor, sample: torch.Tensor, timestep: torch.Tensor, conditions: Conditions,
                      guidance_scale: float, away_from: Iterable[str] = (), rescale: float = 0.0) -> torch.Tensor:
    """pred(c1) + w (pred(c2) - pred(c1)) with c2 = every condition in ``conditions``, c1 = ``away_from``;
    then ``rescale`` (see the module's docstring)."""
    away_from = list(away_from)
    c2 = only(conditions, conditions.values)
    c1 = only(conditions, away_from)
    timesteps = _per_sample(timestep, sample)
    both = model(torch.cat([sample, sample]), torch.cat([timesteps, timesteps]), Conditions.cat([c1, c2]))
    pred_c1, pred_c2 = both.chunk(2)
    return rescaled(pred_c1 + guidance_scale * (pred_c2 - pred_c1), pred_c2, rescale)


def composed_prediction(model: Predictor, sample: torch.Tensor, timestep: torch.Tensor, conditions: Conditions,
                        weights: Mapping[str, float], base: Iterable[str] = ()) -> torch.Tensor:
    """pred(b) + sum_i w_i (pred(c_i + b) - pred(b)) for each named condition c_i, in one batch; b = ``base``
    (empty by default)."""
    unknown = [n for n in weights if n not in conditions.values]
    if unknown:
        raise ValueError(f"condition weights given for absent condition(s) {', '.join(unknown)}")
    names, base = list(weights), [n for n in base if n not in weights]
    parts = [only(conditions, base)] + [only(conditions, [n, *base]) for n in names]
    timesteps = _per_sample(timestep, sample)
    preds = model(sample.repeat(len(parts), 1, 1, 1), timesteps.repeat(len(parts)), Conditions.cat(parts))
    chunks = preds.chunk(len(parts))
    out = chunks[0].clone()
    for name, chunk in zip(names, chunks[1:]):
        out = out + weights[name] * (chunk - chunks[0])
    return out


class Guidance:
    """A denoiser seen through classifier-free guidance: called like the denoiser, returns the guided prediction.

    scale 1 (or no condition present) is one plain forward; ``weights`` (per-condition scales) replace
    ``scale`` and ``away_from`` when given. ``always`` names conditions kept in every branch (an upsampler's
    low-resolution image, which is never dropped). ``anchor`` names conditions kept in every branch as given
    (dropped where the batch drops them), so they are not guided; a condition also named in ``weights`` is
    guided by its weight instead. ``rescale`` (0 to 1, diffusers' ``guidance_rescale``) applies to ``scale``'s
    guidance, not to per-condition weights.
    """

    def __init__(self, denoiser: Predictor, *, scale: float = 3.0, away_from: Iterable[str] = (),
                 weights: Mapping[str, float] | None = None, always: Iterable[str] = (),
                 anchor: Iterable[str] = (), rescale: float = 0.0):
        rescale = check_rescale(rescale)
        if rescale and weights:
            raise ValueError("guidance_rescale applies to guidance_scale's guidance; it cannot be combined with "
                             "per-condition weights: leave one of them out")
        self.denoiser = denoiser
        self.scale = float(scale)
        self.rescale = rescale
        self.away_from = list(away_from)
        self.weights = dict(weights or {})
        self.always = list(always)
        self.anchor = list(anchor)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        if self.weights:
            return composed_prediction(self._model(conditions), sample, timestep, conditions, self.weights,
                                       self.anchor)
        held = self.always + self.anchor
        guided = [n for n in conditions.present() if n not in held]
        if self.scale == 1.0 or not guided:
            return self.denoiser(sample, timestep, conditions)
        return guided_prediction(self._model(conditions), sample, timestep, conditions, self.scale,
                                 self.away_from + held, self.rescale)

    def _model(self, conditions: Conditions) -> Predictor:
        if not self.always:
            return self.denoiser
        always = self.always

        def with_always(sample, timestep, batch: Conditions):  # the never-dropped conditions back in every branch
            keep = {n: torch.ones_like(batch.keep(n)) for n in always if n in batch.values}
            return self.denoiser(sample, timestep, Conditions(dict(batch.values), {**batch.keep_masks, **keep},
                                                              batch.batch_size))

        return with_always
