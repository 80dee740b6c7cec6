"""Slot-based editing (LSD): remove objects by dropping their slots, transplant them by swapping slots.

A slot condition value is either a tensor (B, N, D) (every slot used) or a dict
{"tokens": (B, N, D), "mask": (B, N) bool, True = slot used}; the base model's global adapter masks unused
slot tokens out of cross-attention (and zeroes them), so a dropped slot has no influence at all, exactly as
if the tensor had N - k slots. The number of slots may also differ from the trained count.

    value = drop_slots(slots, [2, 5])                          # remove slots 2 and 5 of every image
    value = swap_slots(slots_a, slots_b, [(3, 3)])             # slot 3 of A <- slot 3 of B
    value = edit_slots(slots, drop=[2], source=slots_b, swaps=[(1, 4)])   # both, as generate does
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

SlotValue = torch.Tensor | dict[str, torch.Tensor]


def split_slot_value(value: SlotValue) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, N, D), mask (B, N) bool) of a slots condition value (a tensor means every slot is used)."""
    if isinstance(value, dict):
        if set(value) != {"tokens", "mask"}:
            raise ValueError(f"a slots value dict has keys 'tokens' and 'mask', got {sorted(value)}")
        return value["tokens"], value["mask"].to(torch.bool)
    if value.ndim != 3:
        raise ValueError(f"slots must be (B, N, D), got shape {tuple(value.shape)}")
    return value, torch.ones(value.shape[:2], dtype=torch.bool, device=value.device)


def _check_indices(indices: Iterable[int], count: int, what: str) -> list[int]:
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise ValueError(f"{what} slot index {bad[0]} is out of range: the image has slots 0 to {count - 1}")
    return indices


def drop_slots(value: SlotValue, indices: Iterable[int]) -> dict[str, torch.Tensor]:
    """Mark slots ``indices`` unused in every image: {"tokens": (B, N, D), "mask": (B, N) bool}."""
    tokens, mask = split_slot_value(value)
    indices = _check_indices(indices, tokens.shape[1], "dropped")
    mask = mask.clone()
    mask[:, indices] = False
    return {"tokens": tokens, "mask": mask}


def swap_slots(value: SlotValue, source: SlotValue, pairs: Sequence[tuple[int, int]]) -> SlotValue:
    """Replace slot i of ``value`` by slot j of ``source`` for each (i, j) in ``pairs``.

    value: (B, N, D) or dict; source: (B or 1, N', D) or dict (the source's mask travels with the slot).
    Returns the same form as ``value`` (a dict if either carries a mask).
    """
    tokens, mask = split_slot_value(value)
    source_tokens, source_mask = split_slot_value(source)
    if source_tokens.shape[-1] != tokens.shape[-1]:
        raise ValueError(f"cannot swap slots of width {source_tokens.shape[-1]} into slots of width {tokens.shape[-1]}")
    if source_tokens.shape[0] not in (1, tokens.shape[0]):
        raise ValueError(f"the swap source has {source_tokens.shape[0]} images; give 1 or {tokens.shape[0]}")
    targets = _check_indices([i for i, _ in pairs], tokens.shape[1], "target")
    sources = _check_indices([j for _, j in pairs], source_tokens.shape[1], "source")
    tokens, mask = tokens.clone(), mask.clone()
    source_tokens = source_tokens.to(tokens.device, tokens.dtype).expand(tokens.shape[0], -1, -1)
    source_mask = source_mask.to(mask.device).expand(tokens.shape[0], -1)
    for i, j in zip(targets, sources):
        tokens[:, i] = source_tokens[:, j]
        mask[:, i] = source_mask[:, j]
    if isinstance(value, dict) or isinstance(source, dict):
        return {"tokens": tokens, "mask": mask}
    return tokens


def add_slots(value: SlotValue, source: SlotValue, indices: Iterable[int]) -> dict[str, torch.Tensor]:
    """Append slots ``indices`` of ``source`` to ``value`` (insert an object): N grows by len(indices)."""
    tokens, mask = split_slot_value(value)
    source_tokens, source_mask = split_slot_value(source)
    indices = _check_indices(indices, source_tokens.shape[1], "added")
    extra = source_tokens[:, indices].to(tokens.device, tokens.dtype).expand(tokens.shape[0], -1, -1)
    extra_mask = source_mask[:, indices].to(mask.device).expand(tokens.shape[0], -1)
    return {"tokens": torch.cat([tokens, extra], dim=1), "mask": torch.cat([mask, extra_mask], dim=1)}


def edit_slots(value: SlotValue, *, drop: Iterable[int] = (), source: SlotValue | None = None,
               swaps: Sequence[tuple[int, int]] = ()) -> SlotValue:
    """Swaps (from ``source``) first, then drops; indices refer to the original slot order."""
    if swaps:
        if source is None:
            raise ValueError("swapping slots needs a source image (--swap-slots IMAGE:i=j)")
        value = swap_slots(value, source, swaps)
    drop = list(drop)
    return drop_slots(value, drop) if drop else value


def parse_slot_indices(text: str) -> list[int]:
    """'2,5' -> [2, 5] (the --drop-slots syntax)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"slot indices must be comma-separated integers such as 2,5; got {text!r}") from None


def parse_swap(text: str) -> tuple[str, list[tuple[int, int]]]:
    """'IMG:3' -> (IMG, [(3, 3)]); 'IMG:3=5,1' -> (IMG, [(3, 5), (1, 1)]): slot i of the edited image takes
    slot j of IMG (the --swap-slots syntax; the path may itself contain ':')."""
    path, sep, spec = text.rpartition(":")
    if not sep or not path or not spec:
        raise ValueError(f"--swap-slots takes IMAGE:i or IMAGE:i=j[,k=l...] (slot i <- slot j of IMAGE); got {text!r}")
    pairs = []
    for part in spec.split(","):
        target, _, source = part.partition("=")
        try:
            pairs.append((int(target), int(source) if source else int(target)))
        except ValueError:
            raise ValueError(f"--swap-slots: {part!r} is not i or i=j with integer slot indices") from None
    return path, pairs


def load_slots(pipe, path: str, size: int = 64) -> torch.Tensor:
    """(1, N, D) slots of ``path``: an image encoded by the pipeline's slot encoder (deterministic initial slots),
    or a ``.npy`` of shape (N, D) written by `composer-diffusion decompose` or `segment`."""
    from pathlib import Path

    import numpy as np

    if str(path).endswith(".npy"):
        if not Path(path).is_file():
            raise FileNotFoundError(f"slots file {path} does not exist; check the path")
        array = np.load(path, allow_pickle=False)
        if array.ndim != 2:
            raise ValueError(f"{path} has shape {array.shape}; slots need (N, D)")
        return torch.from_numpy(array).float()[None]
    from composer.imageio import load_image

    if pipe.decomposers is None or "slots" not in pipe.decomposers.names:
        raise ValueError("this pipeline has no slot encoder; it was trained without slots")
    image = load_image(path, size).to(pipe.device)
    with torch.no_grad():
        return pipe.decomposers.decompose(image, names=["slots"])["slots"].float().cpu()


def slots_from_arguments(pipe, slots_path: str, drop: str | None = None, swap: str | None = None,
                         size: int = 64) -> SlotValue:
    """The slots condition of generate's ``--slots IMG [--drop-slots 2,5] [--swap-slots IMG2:3]``.

    Returns (1, N, D) slots, or {"tokens", "mask"} when slots are dropped: put it in the Conditions as "slots"."""
    slots = load_slots(pipe, slots_path, size)
    source, pairs = None, []
    if swap:
        source_path, pairs = parse_swap(swap)
        source = load_slots(pipe, source_path, size)
    return edit_slots(slots, drop=parse_slot_indices(drop) if drop else (), source=source, swaps=pairs)
