"""`composer-diffusion segment`: the slot attention masks of an image as an unsupervised segmentation."""

from __future__ import annotations

import argparse
from pathlib import Path

from composer.commands._common import add_runtime_arguments, positive_int
from composer.runtime import resolve_device


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    add_runtime_arguments(parser, precision=False)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment", help="unsupervised object segmentation from a trained slot encoder",
        description="Encode IMAGE with the slot encoder of the pipeline folder --model and write DIR/overlay.png "
        "(the image tinted by slot), DIR/segmentation.png (argmax slot colours), DIR/slot-XX.png (each slot's "
        "soft mask) and DIR/sheet.png. Slot i has the same colour in every picture and is index i of "
        "--drop-slots / --swap-slots in generate.",
    )
    parser.add_argument("image", help="input image (PNG, JPEG, ...)")
    parser.add_argument("--model", required=True, help="pipeline folder trained with slots (or a slot encoder folder)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--size", type=positive_int, default=None,
                        help="resize and centre-crop the image to this side first (default: the encoder's resolution)")
    parser.add_argument("--num-slots", type=int, default=None, help="slots to use (default: the trained count)")
    parser.add_argument("--alpha", type=float, default=0.55, help="tint strength of the overlay in [0, 1] (default 0.55)")
    add_device_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from composer.imageio import labelled_row, load_image, save_image
    from composer.pipelines.layout import slot_encoder_folder
    from composer.slots.visuals import overlay, segmentation_map
    from decomposers.slots import SlotsDecomposer

    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.num_slots is not None and args.num_slots < 1:
        raise ValueError(f"--num-slots must be at least 1, got {args.num_slots}")
    device = resolve_device(args.device)
    encoder = SlotsDecomposer.from_pretrained(slot_encoder_folder(args.model), device=device)
    image = load_image(args.image, args.size or encoder.input_resolution).to(device)
    with torch.no_grad():
        slots, masks = encoder.encode(image, num_slots=args.num_slots)
    image, masks = image.cpu(), masks.cpu()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tinted = overlay(image, masks, args.alpha)
    segmentation = segmentation_map(masks)
    save_image(tinted, out / "overlay.png")
    save_image(segmentation, out / "segmentation.png")
    tiles = [("input", image), ("overlay", tinted), ("segmentation", segmentation)]
    areas = (masks.argmax(1)[0].flatten().bincount(minlength=masks.shape[1]).float() / masks[0, 0].numel()).tolist()
    for index in range(masks.shape[1]):
        soft = masks[:, index : index + 1].expand(-1, 3, -1, -1)
        save_image(soft, out / f"slot-{index:02d}.png")
        region = image * soft + (1 - soft)  # the slot's part of the image, on white
        tiles.append((f"slot {index} ({areas[index]:.0%})", region))
    labelled_row(tiles, tile=128).save(out / "sheet.png")
    np.save(out / "slots.npy", slots[0].float().cpu().numpy())
    summary = ", ".join(f"{i}: {a:.0%}" for i, a in enumerate(areas))
    print(f"wrote overlay.png, segmentation.png, {masks.shape[1]} slot masks and sheet.png to {out} "
          f"(area per slot: {summary})")
    return 0
