"""`composer-diffusion generate` and `edit`: compose images from any subset of conditions.

Each condition is taken from any image (its representation is extracted by the pipeline's decomposers) or
from a ``.npy`` written by `composer-diffusion decompose`; none at all samples unconditionally.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from composer.commands._common import add_runtime_arguments, finite_float, positive_int
from composer.diffusion.schedulers import SAMPLER_NAMES

# flag -> condition name (images or .npy files)
IMAGE_CONDITIONS = {
    "image_embedding": "image-embedding", "palette": "palette", "sketch": "sketch", "instances": "instances",
    "depth": "depth", "intensity": "intensity", "slots": "slots",
}


def _add_condition_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a pipeline folder (output_dir/pipeline of a training run)")
    parser.add_argument("--caption", default=None, help="caption text")
    for name, flag in IMAGE_CONDITIONS.items():
        parser.add_argument(f"--{flag}", dest=name, default=None, metavar="IMG|NPY",
                            help=f"take {name} from this image (or a .npy representation)")
    parser.add_argument("--drop-slots", default=None, metavar="I,J", help="with --slots: drop these slot indices")
    parser.add_argument("--swap-slots", default=None, metavar="IMG2:I=J",
                        help="with --slots: slot i takes slot j of IMG2 (IMG2:i or IMG2:i=j[,k=l])")
    parser.add_argument("--guidance", type=finite_float, default=None, help="guidance weight w (default: the model's, 3)")
    parser.add_argument("--guidance-rescale", type=finite_float, default=None, metavar="PHI",
                        help="0 to 1: pull the guided prediction's spread back towards the conditional one's (Lin et "
                             "al. 2024), against over-saturation at strong guidance (default: the model's, 0)")
    parser.add_argument("--away-from", default="", help="comma-separated conditions to guide away from (c1)")
    parser.add_argument("--guide-masking", action="store_true",
                        help="in a region edit, guide masking like any condition (default: masking is held in "
                             "c1, so the fill is not pushed away from the known pixels)")
    parser.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the model's, 25)")
    parser.add_argument("--scheduler", choices=SAMPLER_NAMES, default=None, help="sampler (default: the model's)")
    parser.add_argument("--size", type=positive_int, default=None,
                        help="where the cascade stops: 64 (the base), or an upsampling stage's size such as 256 or "
                        "1024 (default: the folder's last stage; 64 for a folder without upsamplers)")
    parser.add_argument("--upsampler-steps", type=positive_int, default=None,
                        help="sampling steps of every upsampling stage (default: each stage's saved count)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=1)
    add_runtime_arguments(parser)
    parser.add_argument("--grid", action="store_true", help="write the outputs beside pictures of the conditions")
    parser.add_argument("--out", required=True, help="output PNG (several images: name-0.png, name-1.png, ...)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="compose images from any subset of conditions",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_condition_arguments(parser)
    parser.add_argument("--mask", default=None, help="mask image (white = region to generate), with --masked-image")
    parser.add_argument("--masked-image", default=None, help="the image the masking condition is built from")
    parser.set_defaults(func=run_generate)
    edit = subparsers.add_parser("edit", help="regenerate a masked region; nothing outside the mask changes",
                                 description="Region edit: pixels outside --mask are returned unchanged.")
    _add_condition_arguments(edit)
    edit.add_argument("--image", required=True, help="the image to edit")
    region = edit.add_mutually_exclusive_group(required=True)
    region.add_argument("--mask", default=None, help="mask image: white = region to regenerate")
    region.add_argument("--mask-phrase", default=None, metavar="TEXT", dest="mask_phrase",
                        help='regenerate the region this phrase names, e.g. "the red striped star" (the folder\'s '
                        "trained LD-ZNet segmenter when it has one, else the zero-shot phrase map; see `mask`)")
    edit.add_argument("--mask-caption", default=None, metavar="TEXT",
                      help="with --mask-phrase: the image's caption holding the phrase (default: the phrase alone)")
    edit.add_argument("--save-mask", default=None, metavar="PNG", help="also write the mask the edit used")
    edit.add_argument("--feather", type=float, default=1.0, metavar="BASE_PX",
                      help="the edit fades in over this many base pixels inside the mask's border (16 px at 1024; "
                      "no pixel outside the mask changes; 0: a hard border; default 1)")
    edit.add_argument("--resample", type=int, default=1, metavar="N",
                      help="RePaint resampling in the base's edit: each step taken N times, noised back in between, "
                      "so the fill is denoised again beside the kept region (N times the base's time; default 1: off)")
    from composer.commands.mask import add_phrase_mask_arguments

    add_phrase_mask_arguments(edit, seed=False)
    edit.set_defaults(func=run_edit)


def _load_condition(pipe, name: str, path: str, size: int):
    import numpy as np
    import torch

    from composer.imageio import load_image

    if path.endswith(".npy"):
        if not Path(path).is_file():
            raise FileNotFoundError(f"--{IMAGE_CONDITIONS[name]} {path}: no such file")
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError:
            raise ValueError(f"{path} is not a readable .npy array; write one with `composer-diffusion decompose`") from None
        tensor = torch.from_numpy(array).float()[None]
        spec = pipe.decomposers.specs().get(name) if pipe.decomposers is not None else None
        if spec is not None:
            expected = (spec.dim,) if not spec.is_local and not spec.num_tokens else None
            if spec.is_local and (tensor.ndim != 4 or tensor.shape[1] != spec.dim):
                raise ValueError(f"{path} has shape {tuple(array.shape)}; {name} needs ({spec.dim}, H, W)")
            if expected and tuple(tensor.shape[1:]) != expected:
                raise ValueError(f"{path} has shape {tuple(array.shape)}; {name} needs {expected}")
        return tensor, None
    return None, load_image(path, size=max(size, 64 if name not in ("image_embedding",) else 224))


def _conditions(pipe, args):
    from composer.conditions import Conditions

    size = int(pipe.unet.config.sample_size)
    accepted = pipe.unet.accepted_conditions
    values, images = {}, {}
    for name in IMAGE_CONDITIONS:
        path = getattr(args, name)
        if path is None:
            continue
        if name not in accepted:
            raise ValueError(f"this model was not trained with {name}; it accepts {', '.join(accepted)}")
        if name == "slots":
            from composer.slots.editing import slots_from_arguments

            values["slots"] = slots_from_arguments(pipe, path, args.drop_slots, args.swap_slots)
            continue
        tensor, image = _load_condition(pipe, name, path, size)
        if tensor is not None:
            values[name] = tensor
        else:
            images[name] = image
    if (args.drop_slots or args.swap_slots) and args.slots is None:
        raise ValueError("--drop-slots and --swap-slots edit the slots of --slots IMG; give --slots too")
    if args.caption is not None and "caption" not in accepted:
        raise ValueError(f"this model was not trained with captions; it accepts {', '.join(accepted)}")
    captions = [args.caption] if args.caption is not None else None
    away = [n.strip() for n in args.away_from.split(",") if n.strip()]
    unknown = [n for n in away if n not in accepted]
    if unknown:
        raise ValueError(f"--away-from names unknown condition(s) {', '.join(unknown)}; choose from {', '.join(accepted)}")
    return Conditions(values), images, captions, away


def _run(args, image=None, mask=None, masking_image=None, pipe=None) -> int:
    import torch

    from composer.imageio import labelled_row, save_image
    from composer.pipelines.composer_pipeline import ComposerPipeline

    if args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}")
    pipe = pipe or ComposerPipeline.from_pretrained(args.model, device=args.device)
    conditions, images, captions, away = _conditions(pipe, args)
    if masking_image is not None:  # generate: the masking condition without a pixel-exact paste-back
        size = int(pipe.unet.config.sample_size)
        small = torch.nn.functional.interpolate(masking_image, size=(size, size), mode="area")
        small_mask = (torch.nn.functional.interpolate(mask, size=(size, size), mode="nearest") > 0.5).float()
        conditions.values["masking"] = torch.cat([small * (1 - small_mask), small_mask], dim=1)
        conditions = type(conditions)(conditions.values)
        mask = None
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
    result = pipe(conditions, images=images or None, captions=captions, image=image, mask=mask,
                  num_inference_steps=args.steps, guidance_scale=args.guidance,
                  guidance_rescale=args.guidance_rescale, away_from=away,
                  guide_masking=args.guide_masking, generator=generators,
                  num_images_per_prompt=args.num_images, output_type="pt", precision=args.precision,
                  sampler=args.scheduler, size=args.size, upsampler_steps=args.upsampler_steps,
                  **({} if mask is None else {"edit_feather": getattr(args, "feather", 1.0),
                                              "edit_resample": getattr(args, "resample", 1)})).images
    out = Path(args.out)
    paths = []
    if args.num_images == 1:
        paths.append(save_image(result[0], out))
    else:
        for i in range(args.num_images):
            paths.append(save_image(result[i], out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}")))
    if args.grid:
        tiles = []
        for name, picture in images.items():
            rep = pipe.decomposers.decompose(picture, names=[name])[name]
            tiles.append((name, pipe.decomposers.visualize(name, rep)))
        tiles += [(f"output {i}", result[i : i + 1]) for i in range(len(result))]
        grid_path = out.with_name(f"{out.stem}-grid.png")
        labelled_row(tiles, tile=128).save(grid_path)
        paths.append(grid_path)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from composer.imageio import load_image, load_mask

    if (args.mask is None) != (args.masked_image is None):
        raise ValueError("--mask and --masked-image go together (white mask pixels = region to generate)")
    if args.mask is None:
        return _run(args)
    image = load_image(args.masked_image, what="--masked-image")
    mask = load_mask(args.mask, what="--mask")
    if mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"--mask is {tuple(mask.shape[-2:])} pixels but --masked-image is {tuple(image.shape[-2:])}")
    return _run(args, mask=mask, masking_image=image)


def run_edit(args: argparse.Namespace) -> int:
    from composer.imageio import load_image, load_mask

    if args.mask_phrase is not None:
        return _edit_by_phrase(args)
    image = load_image(args.image, what="--image")
    mask = load_mask(args.mask, what="--mask")
    if mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"--mask is {tuple(mask.shape[-2:])} pixels but --image is {tuple(image.shape[-2:])}")
    if args.save_mask:
        from composer.commands.mask import save_mask

        save_mask(mask, args.save_mask)
    return _run(args, image=image, mask=mask)


def _edit_by_phrase(args: argparse.Namespace) -> int:
    """edit --mask-phrase: the mask from the phrase (see `mask`), then the same region edit."""
    from composer.commands.mask import phrase_mask_for, save_mask
    from composer.imageio import load_image
    from composer.ldznet.zeroshot import check_phrase
    from composer.pipelines.composer_pipeline import ComposerPipeline

    check_phrase(args.mask_phrase)  # an empty phrase fails before anything loads
    if args.mask_caption is not None and not args.mask_caption.strip():
        raise ValueError("--mask-caption is empty; give the image's caption, or leave --mask-caption out")
    image = load_image(args.image, what="--image")
    pipe = ComposerPipeline.from_pretrained(args.model, device=args.device)
    mask, source, _ = phrase_mask_for(pipe, args.model, image, args.mask_phrase, args.mask_caption, args)
    print(f"mask of {args.mask_phrase!r} from {source}: {float(mask.mean()):.1%} of the image")
    if args.save_mask:
        save_mask(mask, args.save_mask)
    return _run(args, image=image, mask=mask, pipe=pipe)
