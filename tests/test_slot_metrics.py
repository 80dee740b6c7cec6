"""FG-ARI against scikit-learn's adjusted Rand index; mBO on hand-made segmentations."""

import math

import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from composer.slots.metrics import (
    SlotMetricAccumulator,
    adjusted_rand_index,
    foreground_ari,
    mean_best_overlap,
)


def one_hot_masks(assignment: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(B, H, W) slot ids -> (B, N, H, W) soft-looking masks whose argmax is the assignment."""
    masks = torch.rand(*assignment.shape, num_slots) * 0.5
    masks.scatter_(-1, assignment[..., None], 1.0)
    return masks.permute(0, 3, 1, 2)


@pytest.mark.parametrize("size,num_true,num_pred", [(50, 3, 4), (200, 7, 2), (31, 1, 5), (400, 12, 12), (2, 2, 2)])
def test_ari_matches_sklearn_on_random_labelings(size, num_true, num_pred):
    generator = torch.Generator().manual_seed(size)
    for _ in range(5):
        true = torch.randint(num_true, (size,), generator=generator) * 7 + 3  # arbitrary, non-contiguous ids
        pred = torch.randint(num_pred, (size,), generator=generator)
        assert adjusted_rand_index(true, pred) == pytest.approx(adjusted_rand_score(true, pred), abs=1e-12)


def test_ari_matches_sklearn_on_structured_cases():
    base = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    cases = [
        (base, base),  # identical
        (base, (base + 1) % 3 * 10),  # renamed clusters
        (base, torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 3, 3])),  # shifted boundaries
        (base, torch.zeros(10, dtype=torch.long)),  # everything merged
        (base, torch.arange(10)),  # everything split
        (torch.zeros(10, dtype=torch.long), torch.zeros(10, dtype=torch.long)),  # one cluster each
        (torch.zeros(10, dtype=torch.long), torch.arange(10)),
        (torch.tensor([5]), torch.tensor([2])),  # a single sample
    ]
    for true, pred in cases:
        assert adjusted_rand_index(true, pred) == pytest.approx(adjusted_rand_score(true, pred), abs=1e-12)
    assert adjusted_rand_index(base, (base + 1) % 3) == 1.0


def test_foreground_ari_is_sklearn_ari_over_foreground_pixels():
    generator = torch.Generator().manual_seed(0)
    instances = torch.randint(0, 5, (4, 1, 12, 12), generator=generator)
    instances[2] = 0  # an image without foreground
    instances[3] = torch.where(instances[3] > 0, 9, 0)  # a single object (id 9)
    masks = torch.rand(4, 6, 12, 12, generator=generator)
    scores = foreground_ari(instances, masks)
    assignment = masks.argmax(1)
    for i in (0, 1, 3):
        foreground = instances[i, 0] > 0
        expected = adjusted_rand_score(instances[i, 0][foreground], assignment[i][foreground])
        assert scores[i].item() == pytest.approx(expected, abs=1e-12)
    assert math.isnan(scores[2].item())


def test_foreground_ari_ignores_background_and_slot_names():
    instances = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    instances[0, 0, :4, :4] = 1
    instances[0, 0, 4:, 4:] = 2
    assignment = torch.full((1, 8, 8), 3)  # the background in slot 3 ...
    assignment[0, :4, :4] = 0
    assignment[0, 4:, 4:] = 2
    assignment[0, :4, 4:] = 0  # ... except one background quadrant in object 1's slot: ignored by FG-ARI
    masks = one_hot_masks(assignment, 4)
    assert foreground_ari(instances, masks).item() == 1.0
    merged = assignment.clone()
    merged[0, 4:, 4:] = 0  # both objects in one slot
    assert foreground_ari(instances, one_hot_masks(merged, 4)).item() == pytest.approx(0.0, abs=1e-12)


def test_mean_best_overlap_on_hand_made_masks():
    instances = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    instances[0, 0, :2, :2] = 1  # object 1: 4 pixels
    instances[0, 0, 2:, :] = 2  # object 2: 8 pixels
    assignment = torch.zeros(1, 4, 4, dtype=torch.long)  # slot 0: the rest
    assignment[0, :2, :2] = 1  # slot 1 covers object 1 exactly: IoU 1
    assignment[0, 2:, :2] = 2  # slot 2 covers half of object 2: IoU 4/8
    assignment[0, 2:, 2:] = 3  # slot 3 the other half: IoU 4/8
    masks = one_hot_masks(assignment, 4)
    assert mean_best_overlap(instances, masks).item() == pytest.approx((1.0 + 0.5) / 2)
    assignment[0, :2, 2:] = 3  # slot 3 grows into the background: 4 / (8 + 4) for object 2 -> best stays 0.5 (slot 2)
    assert mean_best_overlap(instances, one_hot_masks(assignment, 4)).item() == pytest.approx(0.75)
    assignment[0, 2:, :] = 3  # slot 3 now covers object 2 and 4 background pixels: IoU 8/12
    assert mean_best_overlap(instances, one_hot_masks(assignment, 4)).item() == pytest.approx((1.0 + 8 / 12) / 2)
    assert math.isnan(mean_best_overlap(torch.zeros(1, 1, 4, 4, dtype=torch.long), masks).item())


def test_mean_best_overlap_per_image_of_a_batch_matches_single_images():
    generator = torch.Generator().manual_seed(1)
    instances = torch.randint(0, 4, (3, 1, 10, 10), generator=generator)
    instances[1] = torch.where(instances[1] == 3, 0, instances[1] + 20)  # ids that only occur in one image
    masks = torch.rand(3, 5, 10, 10, generator=generator)
    batch = mean_best_overlap(instances, masks)
    for i in range(3):
        torch.testing.assert_close(batch[i : i + 1], mean_best_overlap(instances[i : i + 1], masks[i : i + 1]))
        ids = [v for v in instances[i].unique().tolist() if v > 0]
        assignment = masks[i].argmax(0)
        ious = []
        for object_id in ids:
            region = instances[i, 0] == object_id
            ious.append(max((region & (assignment == s)).sum().item() / (region | (assignment == s)).sum().item()
                            for s in range(5)))
        assert batch[i].item() == pytest.approx(sum(ious) / len(ious), abs=1e-9)


def test_accumulator_averages_over_images_with_objects():
    instances = torch.zeros(3, 1, 4, 4, dtype=torch.long)
    instances[0, 0, :2] = 1
    instances[1, 0, :, :2] = 1
    instances[1, 0, :, 2:] = 2
    masks = one_hot_masks((instances[:, 0] > 0).long(), 2)  # image 1: both objects in one slot
    accumulator = SlotMetricAccumulator()
    accumulator.update(instances[:2], masks[:2])
    accumulator.update(instances[2:], masks[2:])
    result = accumulator.result()
    assert result["images"] == 3 and result["images_with_objects"] == 2
    assert result["fg_ari"] == pytest.approx((1.0 + 0.0) / 2)
    assert result["mbo"] == pytest.approx((1.0 + 0.5) / 2)
    with pytest.raises(ValueError, match="upsample"):
        foreground_ari(instances, masks[..., :2])
