"""`composer-diffusion mask`: a binary mask of the region a phrase names (white = the phrase's region).

With a trained LD-ZNet segmenter in the model folder (its ldznet/ component) the mask is the segmenter's
probability >= 0.5; otherwise (or with --zero-shot) it is the zero-shot map: the prediction with the caption
holding the phrase against the caption without it (the phrase's word tokens masked, the sentence re-encoded),
averaged over --timesteps and --draws, smoothed, normalised and thresholded (--threshold). Without --caption the
phrase is the caption and "without" is no caption. `edit --mask-phrase` makes its mask the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from composer.commands._common import add_runtime_arguments


def register(subparsers) -> None:
    parser = subparsers.add_parser("mask", help="a mask from a phrase (LD-ZNet segmenter, or zero-shot)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a pipeline folder trained with captions")
    parser.add_argument("--image", required=True, help="the image to segment")
    parser.add_argument("--phrase", required=True, help='the words naming the region, e.g. "the red striped star"')
    parser.add_argument("--caption", default=None,
                        help="the image's caption holding the phrase (zero-shot; default: the phrase alone)")
    add_phrase_mask_arguments(parser)
    add_runtime_arguments(parser)
    parser.add_argument("--map", default=None, metavar="PNG",
                        help="also write the map the mask was cut from (the segmenter's probabilities or the zero-shot map)")
    parser.add_argument("--out", required=True, help="output mask PNG (white = the phrase's region)")
    parser.set_defaults(func=run)


def add_phrase_mask_arguments(parser: argparse.ArgumentParser, seed: bool = True) -> None:
    """--threshold, --smooth, --zero-shot, --timesteps, --draws (and --seed): how a phrase becomes a mask (shared
    with `edit --mask-phrase`, whose --seed is the generation's)."""
    from composer.commands.attribute import add_level_arguments
    from composer.ldznet.zeroshot import (
        DEFAULT_REMOVAL,
        DEFAULT_SMOOTH,
        DEFAULT_THRESHOLD,
        DEFAULT_THRESHOLD_ALONE,
        REMOVALS,
    )

    add_level_arguments(parser, seed=seed)
    parser.add_argument("--threshold", default=None, metavar="otsu|F",
                        help=f"zero-shot rule: otsu, or a fraction of the map's maximum such as 0.5 (default "
                        f"{DEFAULT_THRESHOLD} with a caption, {DEFAULT_THRESHOLD_ALONE} for the phrase alone)")
    parser.add_argument("--smooth", type=float, default=DEFAULT_SMOOTH, metavar="SIGMA",
                        help=f"zero-shot: Gaussian blur of the map in model pixels (default {DEFAULT_SMOOTH:g}; 0 = none)")
    parser.add_argument("--removal", choices=REMOVALS, default=DEFAULT_REMOVAL,
                        help="zero-shot, with a caption: the caption without the phrase has the phrase's word tokens "
                        "masked and its sentence re-encoded (mask), or is re-encoded whole (reencode) "
                        f"(default {DEFAULT_REMOVAL})")
    parser.add_argument("--zero-shot", action="store_true", dest="zero_shot",
                        help="use the zero-shot map even when the folder has a trained LD-ZNet segmenter")


def phrase_mask_for(pipe: Any, folder: str, image, phrase: str, caption: str | None, args: argparse.Namespace):
    """(mask (B, 1, H, W) float in {0, 1} at the image's size, what made it, the map it was cut from).

    The folder's LD-ZNet segmenter (composer.ldznet.segmenter, when that module exists and the folder has one)
    unless --zero-shot; else the zero-shot phrase map thresholded by --threshold."""
    import torch

    from composer.commands.attribute import map_precision
    from composer.ldznet.zeroshot import (
        check_phrase,
        default_threshold,
        parse_threshold,
        phrase_map,
        threshold_map,
    )

    phrase = check_phrase(phrase)
    rule = parse_threshold(default_threshold(caption) if args.threshold is None else args.threshold)
    if args.smooth < 0:
        raise ValueError(f"--smooth must be >= 0 pixels, got {args.smooth}")
    segmenter = None if args.zero_shot else _segmenter(folder, args)
    if segmenter is not None:
        probabilities = segmenter.predict(image.float(), [phrase] * image.shape[0]).float().cpu()
        if probabilities.shape[-2:] != image.shape[-2:]:
            probabilities = torch.nn.functional.interpolate(probabilities, size=image.shape[-2:], mode="bilinear",
                                                            align_corners=False)
        mask = (probabilities >= 0.5).float()
        if not bool(mask.any()):
            raise ValueError(f"the LD-ZNet segmenter finds nothing for {phrase!r} in this image (no pixel reaches "
                             "probability 0.5); try other words, --zero-shot, or draw a --mask")
        return mask, "the trained LD-ZNet segmenter (probability >= 0.5)", probabilities
    heat = phrase_map(pipe, image, phrase, caption, timesteps=args.timesteps, draws=args.draws, smooth=args.smooth,
                      removal=args.removal,
                      generator=torch.Generator().manual_seed(args.seed), precision=map_precision(args, pipe))
    how = f"threshold {rule}" if rule == "otsu" else f"threshold {rule:g} of the maximum"
    where = f"inside the caption, {args.removal}" if caption else "the phrase alone"
    source = f"the zero-shot phrase map ({where}, {how})"
    return threshold_map(heat, rule).float(), source, heat


def _segmenter(folder: str, args: argparse.Namespace):
    """The folder's trained LD-ZNet segmenter, or None when the folder has none."""
    from composer.ldznet.segmenter import load_segmenter

    return load_segmenter(folder, device=args.device, precision=args.precision or "auto")


def run(args: argparse.Namespace) -> int:
    from composer.imageio import load_image, save_image
    from composer.ldznet.attribution import heat_colours, normalise
    from composer.ldznet.zeroshot import check_phrase
    from composer.pipelines.composer_pipeline import ComposerPipeline

    check_phrase(args.phrase)  # an empty phrase fails before anything loads
    if args.caption is not None and not args.caption.strip():
        raise ValueError("--caption is empty; give the image's caption, or leave --caption out")
    image = load_image(args.image, what="--image")
    pipe = ComposerPipeline.from_pretrained(args.model, device=args.device)
    mask, source, heat = phrase_mask_for(pipe, args.model, image, args.phrase, args.caption, args)
    paths = [save_mask(mask, args.out)]
    if args.map is not None:
        paths.append(save_image(heat_colours(normalise(heat, 0.99)), args.map))
    share = float(mask.mean())
    print(f"mask of {args.phrase!r} from {source}: {share:.1%} of the image; wrote {', '.join(map(str, paths))}")
    return 0


def save_mask(mask, path: str | Path) -> Path:
    """Write a (1, 1, H, W) {0, 1} mask as a black-and-white PNG (white = 1)."""
    from composer.imageio import save_image

    return save_image(mask[:1].float().expand(-1, 3, -1, -1), path)
