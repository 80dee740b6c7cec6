"""Zero-shot phrase masks (LD-ZNet): where the model puts a phrase, with no segmentation training.

    heat = phrase_map(pipe, image, "a large red striped star", caption=scene_caption)   # (B, 1, H, W) eps units
    mask = phrase_mask(pipe, image, "a large red striped star", caption=scene_caption)  # (B, 1, H, W) bool

The map of a phrase is the attribution of the phrase inside its caption, per pixel,

    M(p) = mean over levels, draws, channels of |eps(x_t, caption) - eps(x_t, caption without the phrase)|[p]

"The caption without the phrase" is made one of two ways (``removal``): "mask" keeps the caption's word tokens
except the phrase's own (masked out of cross-attention) and re-encodes the sentence embedding from the caption
text with the phrase removed; "reencode" (the default) re-encodes the whole caption without the phrase, tokens
and sentence. CLIP's text tower is causal, so under "mask" the caption's later tokens still carry the phrase; on
the demo model "reencode" gives clearly better masks (mIoU 0.377 against 0.274 on the 97 phrases of held-out
scenes 0-31, where these defaults were chosen; 0.320 against 0.256 on the 105 of scenes 32-63, a check:
scripts/ldznet_zeroshot.py). With no caption the caption is the phrase itself, and "without" is the caption
dropped (the unconditional prediction), which there gives far weaker masks (mIoU 0.10-0.12). The map is computed
at the model's resolution, smoothed (a 1 px Gaussian), resized to the image's (bilinear), divided by its maximum
and thresholded: at 0.6 of it inside a caption, by Otsu's rule for the phrase alone (``threshold_map``; the best
of Otsu, 0.5, 0.6 and 0.7 for each on both scene sets).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from composer.conditions import CAPTION, Conditions
from composer.ldznet.attribution import (
    DEFAULT_DRAWS,
    DEFAULT_MAX_BATCH,
    DEFAULT_TIMESTEPS,
    image_conditions,
    normalise,
    prediction_differences,
    to_size,
)
from composer.models.adapters import resize_map

# The rule phrase_mask uses unless told otherwise: see scripts/ldznet_zeroshot.py for the measurements behind it.
DEFAULT_THRESHOLD: str | float = 0.6  # inside a caption
DEFAULT_THRESHOLD_ALONE: str | float = "otsu"  # the phrase alone (no caption)
ARTICLES = ("a", "an", "the")  # a phrase's leading article matches any of these in the caption, or none
REMOVALS = ("mask", "reencode")  # how "the caption without the phrase" is made (see without_phrase)
DEFAULT_REMOVAL = "reencode"
DEFAULT_SMOOTH = 1.0  # Gaussian sigma in pixels at the model's resolution


def phrase_maps(pipe: Any, image: Any, phrases: Sequence[str], caption: str | Sequence[str] | None = None, *,
                base: Iterable[str] = (), timesteps: Iterable[int] = DEFAULT_TIMESTEPS, draws: int = DEFAULT_DRAWS,
                smooth: float = DEFAULT_SMOOTH, generator: torch.Generator | None = None, precision: str = "fp32",
                max_batch: int = DEFAULT_MAX_BATCH, per_level: bool = False,
                removal: str = DEFAULT_REMOVAL) -> torch.Tensor:
    """The maps of several phrases of one image batch, from one set of noised images and batched forwards.

    pipe: a ComposerPipeline with a caption decomposer; image: (B, 3, H, W) in [0, 1] (or anything the pipeline
    takes as an image); phrases: P phrases; caption: the caption(s) holding every phrase (one, or one per image),
    or None (each phrase is its own caption). base: conditions decomposed from the image and kept in both
    predictions (default none). smooth: the sigma, in pixels at the model's resolution, of a Gaussian blur of
    the map before it is resized (0: none); per-pixel differences are noisy, objects are not. removal: how the
    caption without a phrase is made (``without_phrase``). Returns (P, B, 1, H, W) float32 >= 0 in eps units at
    the image's size, or (P, L, B, 1, H, W) per noise level with ``per_level``.
    """
    from composer.pipelines import inputs

    # 1. Check inputs
    phrases = [check_phrase(p) for p in phrases]
    if not phrases:
        raise ValueError("give at least one phrase")
    if pipe.decomposers is None or CAPTION not in pipe.decomposers.names or CAPTION not in pipe.unet.accepted_conditions:
        raise ValueError("phrase masks need a model trained with captions (a caption decomposer); this one has none")
    device = pipe.unet.device
    image = inputs.as_image(image).to(device)
    batch = image.shape[0]
    captions = _captions(caption, batch)
    # 2. The branches: with and without each phrase, over the same base
    base = list(base)
    kept = image_conditions(pipe, image, images={n: image for n in base}) if base else Conditions({}, {}, batch)
    if captions is None:  # each phrase is its own caption, against the caption dropped
        branches = [kept] + [_with_caption(kept, _encode(pipe, [p] * batch)) for p in phrases]
        pairs = [(k + 1, 0) for k in range(len(phrases))]
    else:
        full = _encode(pipe, captions)
        branches = [_with_caption(kept, full)] + [
            _with_caption(kept, without_phrase(pipe, captions, full, p, removal=removal)) for p in phrases]
        pairs = [(0, k + 1) for k in range(len(phrases))]
    # 3. The differences at the model's resolution, then at the image's
    size = int(pipe.unet.config.sample_size)
    small = resize_map(image, (size, size), "smooth").clamp(0, 1)
    diffs = prediction_differences(pipe.denoiser, small, branches, pairs, timesteps=timesteps, draws=draws,
                                   generator=generator, precision=precision, max_batch=max_batch, per_level=per_level)
    flat = diffs.flatten(0, 1) if per_level else diffs
    out = torch.stack([to_size(smooth_map(d, smooth), image.shape[-2:]) for d in flat])
    return out.unflatten(0, diffs.shape[:2]) if per_level else out


def phrase_map(pipe: Any, image: Any, phrase: str, caption: str | Sequence[str] | None = None,
               **options: Any) -> torch.Tensor:
    """(B, 1, H, W) float32 >= 0, eps units: where the model puts ``phrase`` on ``image`` (see the module's
    docstring; ``options`` are phrase_maps'), at the image's size."""
    return phrase_maps(pipe, image, [phrase], caption, **options)[0]


def phrase_mask(pipe: Any, image: Any, phrase: str, caption: str | Sequence[str] | None = None, *,
                threshold: str | float | None = None, **options: Any) -> torch.Tensor:
    """(B, 1, H, W) bool, True inside the region of ``phrase``: its map normalised and thresholded
    (``threshold_map``; default rule: ``default_threshold(caption)``)."""
    rule = default_threshold(caption) if threshold is None else threshold
    return threshold_map(phrase_map(pipe, image, phrase, caption, **options), rule)


def default_threshold(caption: Any) -> str | float:
    """The measured best rule: 0.6 of the maximum inside a caption, Otsu's for the phrase alone (caption None)."""
    return DEFAULT_THRESHOLD_ALONE if caption is None else DEFAULT_THRESHOLD


def smooth_map(values: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, 1, H, W) maps blurred by a Gaussian of ``sigma`` pixels (kernel 2 * ceil(3 sigma) + 1); 0 leaves them."""
    sigma = float(sigma)
    if sigma < 0:
        raise ValueError(f"the smoothing sigma must be >= 0 pixels, got {sigma}")
    if sigma == 0:
        return values
    from kornia.filters import gaussian_blur2d

    size = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur2d(values.float(), (size, size), (sigma, sigma), border_type="reflect")


def threshold_map(values: torch.Tensor, threshold: str | float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """(B, 1, H, W) maps -> (B, 1, H, W) bool masks, each map first divided by its own maximum.

    threshold: "otsu" (Otsu's threshold of each normalised map's values: the cut that best separates them into
    two classes) or a number f in (0, 1) (pixels at least f times the map's maximum). The maximum pixel is always
    inside, so a mask is never empty.
    """
    rule = parse_threshold(threshold)
    scaled = normalise(values.float())
    if rule != "otsu":
        return scaled >= float(rule)
    from skimage.filters import threshold_otsu

    masks = []
    for sample in scaled:
        array = sample.cpu().numpy().ravel()
        cut = float(threshold_otsu(array)) if float(array.max() - array.min()) > 1e-12 else 0.0
        masks.append(sample > cut if cut < 1.0 else sample >= 1.0)
    return torch.stack(masks).to(values.device)


def parse_threshold(threshold: str | float) -> str | float:
    """"otsu" or a float in (0, 1), from a rule or its text (the CLI's --threshold); a clear error otherwise."""
    if isinstance(threshold, str):
        text = threshold.strip().lower()
        if text == "otsu":
            return "otsu"
        try:
            threshold = float(text)
        except ValueError:
            raise ValueError(f"threshold {threshold!r} is not a rule: give otsu or a fraction of the map's maximum "
                             "such as 0.5") from None
    value = float(threshold)
    if not 0.0 < value < 1.0:
        raise ValueError(f"a threshold fraction must lie strictly between 0 and 1, got {threshold}")
    return value


# --- the caption with and without a phrase -------------------------------------------------------------------


def without_phrase(pipe: Any, captions: Sequence[str], full: Conditions, phrase: str, *,
                   removal: str = DEFAULT_REMOVAL) -> Conditions:
    """The caption condition of ``captions`` with ``phrase`` taken out (dropped where nothing else is left).

    removal "mask": the phrase's word tokens masked out of ``full``'s, the sentence re-encoded from the text with the
    phrase removed (the later tokens, which attended to the phrase, are kept); "reencode": the whole caption (tokens
    and sentence) re-encoded from the text with the phrase removed.
    """
    if removal not in REMOVALS:
        raise ValueError(f"removal must be one of {', '.join(REMOVALS)}, got {removal!r}")
    tokenizer, length = _tokenizer(pipe)
    value = full[CAPTION]
    removed = [remove_phrase(c, phrase) for c in captions]
    if removal == "reencode":
        rest = _encode(pipe, removed)
        return Conditions(dict(rest.values), {CAPTION: rest.keep(CAPTION) & full.keep(CAPTION)}, len(captions))
    positions = torch.stack([phrase_positions(tokenizer, c, phrase, length) for c in captions])
    positions = positions[:, : value["words_mask"].shape[1]].to(value["words_mask"].device)
    rest = _encode(pipe, removed)
    mask = value["words_mask"] & ~positions
    words = value["words"] * mask[..., None].to(value["words"].dtype)
    return Conditions({CAPTION: {"sentence": rest[CAPTION]["sentence"], "words": words, "words_mask": mask}},
                      {CAPTION: rest.keep(CAPTION) & full.keep(CAPTION)}, len(captions))


def phrase_positions(tokenizer: Any, caption: str, phrase: str, context_length: int) -> torch.Tensor:
    """(context_length,) bool: the caption's token positions that spell ``phrase`` (every occurrence, as
    ``find_phrase`` matches it).

    Words are tokenized on their own by CLIP's BPE (lower-cased, punctuation split off), so the tokens of the
    matched words appear in the caption's as a contiguous run."""
    ids = tokenizer([caption], context_length=context_length)[0].tolist()
    special = {getattr(tokenizer, "sot_token_id", None), getattr(tokenizer, "eot_token_id", None), 0}
    positions = torch.zeros(context_length, dtype=torch.bool)
    for words in find_phrase(caption, phrase):
        wanted = [i for i in tokenizer([words], context_length=context_length)[0].tolist() if i not in special]
        for start in range(len(ids) - len(wanted) + 1):
            if wanted and ids[start : start + len(wanted)] == wanted:
                positions[start : start + len(wanted)] = True
    if not bool(positions.any()):
        raise ValueError(f"the phrase {phrase!r} lies past the first {context_length} tokens of the caption "
                         f"{caption!r}, which the text encoder reads; give a shorter caption")
    return positions


def find_phrase(caption: str, phrase: str) -> list[str]:
    """The caption's words that ``phrase`` names, one string per occurrence: the phrase's words in order (case and
    spacing ignored, whole words), its leading article (a, an, the) matching any article or none, so
    "the large red star" finds "a large red star". ValueError when the caption does not hold the phrase."""
    found = [m.group(0) for m in _phrase_pattern(phrase).finditer(caption)]
    if not found:
        raise ValueError(f"the phrase {phrase!r} is not in the caption {caption!r}; give a phrase made of the "
                         "caption's words (or no caption: the phrase alone)")
    return found


def remove_phrase(caption: str, phrase: str) -> str:
    """``caption`` with every occurrence of ``phrase`` (as ``find_phrase`` matches it) removed and the spacing
    tidied; '' when nothing else is left."""
    find_phrase(caption, phrase)
    rest = _phrase_pattern(phrase).sub(" ", caption)
    return re.sub(r"\s+([,.;:])", r"\1", re.sub(r"\s+", " ", rest)).strip(" ,.;:")


def _phrase_pattern(phrase: str) -> re.Pattern:
    words = phrase.split()
    if len(words) > 1 and words[0].lower() in ARTICLES:
        words = words[1:]
    body = r"\s+".join(re.escape(word) for word in words)
    articles = "|".join(ARTICLES)
    return re.compile(rf"(?<!\w)(?:(?:{articles})\s+)?{body}(?!\w)", re.IGNORECASE)


def check_phrase(phrase: Any) -> str:
    """The phrase with its spacing tidied; a clear error when it is empty or not text."""
    if not isinstance(phrase, str):
        raise TypeError(f"a phrase must be text, got {type(phrase).__name__}")
    if not phrase.strip():
        raise ValueError("the phrase is empty; give the words that name the region, e.g. 'the red star'")
    return " ".join(phrase.split())


def _captions(caption: str | Sequence[str] | None, batch: int) -> list[str] | None:
    if caption is None:
        return None
    captions = [caption] * batch if isinstance(caption, str) else list(caption)
    if len(captions) == 1 and batch > 1:
        captions = captions * batch
    if len(captions) != batch:
        raise ValueError(f"give one caption or one per image: got {len(captions)} captions for {batch} images")
    if any(not isinstance(c, str) or not c.strip() for c in captions):
        raise ValueError("a caption is empty; give the image's caption text, or none (the phrase alone)")
    return captions


def _tokenizer(pipe: Any) -> tuple[Any, int]:
    decomposer = pipe.decomposers.decomposers[CAPTION]
    return decomposer.tokenizer, int(decomposer.context_length)


def _encode(pipe: Any, captions: Sequence[str]) -> Conditions:
    with torch.no_grad():
        return pipe.decompose({}, list(captions)).to(pipe.unet.device)


def _with_caption(kept: Conditions, caption: Conditions) -> Conditions:
    return Conditions({**kept.values, CAPTION: caption[CAPTION]}, {**kept.keep_masks, CAPTION: caption.keep(CAPTION)},
                      kept.batch_size)


class ZeroShotSegmenter:
    """Zero-shot phrase masks behind the trained Segmenter's interface, so both are evaluated the same way.

    predict(images (B, 3, H, W) in [0, 1], phrases: B strings, captions: B strings or None) -> (B, 1, H, W) float32
    in {0, 1}: each image's phrase mask (``phrase_mask``), every image noised with the same seeded draws, so a batch
    gives the same masks as its singles. ``options`` are phrase_maps' (timesteps, draws, smooth, base, ...).
    """

    def __init__(self, pipe: Any, *, threshold: str | float | None = None, seed: int = 0, **options: Any):
        self.pipe = pipe
        self.threshold = None if threshold is None else parse_threshold(threshold)  # None: default_threshold
        self.seed = int(seed)
        self.options = options

    def maps(self, images: torch.Tensor, phrases: Sequence[str],
             captions: Sequence[str] | None = None) -> torch.Tensor:
        """(B, 1, H, W) float32 >= 0: each image's phrase map in eps units."""
        if len(phrases) != images.shape[0] or (captions is not None and len(captions) != images.shape[0]):
            raise ValueError(f"give one phrase (and caption) per image: {images.shape[0]} images, {len(phrases)} "
                             f"phrases{'' if captions is None else f', {len(captions)} captions'}")
        return torch.cat([phrase_map(self.pipe, images[i : i + 1], phrase, None if captions is None else captions[i],
                                     generator=torch.Generator().manual_seed(self.seed), **self.options)
                          for i, phrase in enumerate(phrases)])

    def predict(self, images: torch.Tensor, phrases: Sequence[str],
                captions: Sequence[str] | None = None) -> torch.Tensor:
        rule = default_threshold(captions) if self.threshold is None else self.threshold
        return threshold_map(self.maps(images, phrases, captions), rule).float()
