"""Core model invariants: adapters, every condition subset, dropout statistics, guidance."""

import itertools

import pytest
import torch

from composer.conditions import Conditions, ConditionSpec
from composer.diffusion.dropout import DropoutPolicy
from composer.diffusion.guidance import Guidance, composed_prediction, guided_prediction
from composer.models.config import model_kwargs
from composer.models.unet import ComposerUNet
from composer.runtime import resolve_precision

SPECS = {
    "caption": ConditionSpec("caption", ("global", "tokens"), 16, token_dim=12, num_tokens=7, vector_key="sentence",
                             tokens_key="words", mask_key="words_mask"),
    "image_embedding": ConditionSpec("image_embedding", ("global",), 16),
    "palette": ConditionSpec("palette", ("global",), 275),
    "slots": ConditionSpec("slots", ("tokens",), 8, num_tokens=3),
    "sketch": ConditionSpec("sketch", ("local",), 1),
    "instances": ConditionSpec("instances", ("local",), 5),
    "depth": ConditionSpec("depth", ("local",), 1),
    "intensity": ConditionSpec("intensity", ("local",), 1),
    "masking": ConditionSpec("masking", ("local",), 4),
}
TINY = dict(block_out_channels=(16, 32), attention_heads=(1, 2), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), context_dim=16, local_embed_channels=4, sample_size=16)


def tiny_model(seed: int = 0) -> ComposerUNet:
    torch.manual_seed(seed)
    return ComposerUNet(**model_kwargs("tiny", TINY, SPECS)).eval()


def fake_conditions(batch: int, size: int = 16, seed: int = 1) -> Conditions:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 7, dtype=torch.bool)
    mask[:, 5:] = False
    return Conditions({
        "caption": {"sentence": torch.randn(batch, 16, generator=g), "words": torch.randn(batch, 7, 12, generator=g),
                    "words_mask": mask},
        "image_embedding": torch.randn(batch, 16, generator=g),
        "palette": torch.rand(batch, 275, generator=g),
        "slots": torch.randn(batch, 3, 8, generator=g),
        "sketch": torch.rand(batch, 1, size, size, generator=g),
        "instances": torch.rand(batch, 5, size, size, generator=g),
        "depth": torch.rand(batch, 1, size, size, generator=g),
        "intensity": torch.rand(batch, 1, size, size, generator=g),
        "masking": torch.rand(batch, 4, size, size, generator=g),
    })


def test_every_subset_of_conditions_runs_and_each_condition_matters():
    model = tiny_model()
    conditions = fake_conditions(2)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    names = list(conditions.values)
    outputs = {}
    with torch.no_grad():
        for r in range(len(names) + 1):
            for subset in itertools.combinations(names, r):
                eps = model(x, t, conditions.subset(subset))
                assert eps.shape == (2, 3, 16, 16) and torch.isfinite(eps).all()
                outputs[subset] = eps
    assert len(outputs) == 2 ** len(names)
    for name in names:  # adding one condition to the empty set changes the prediction
        assert not torch.allclose(outputs[()], outputs[(name,)])


def test_missing_and_dropped_are_the_same_and_dropped_values_do_not_leak():
    model = tiny_model()
    conditions = fake_conditions(2)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 3])
    dropped = conditions.with_keep({"palette": torch.tensor([False, False]), "caption": torch.tensor([False, False]),
                                    "depth": torch.tensor([False, False])})
    missing = conditions.subset([n for n in conditions.values if n not in ("palette", "caption", "depth")])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, dropped), model(x, t, missing))
        other = Conditions({**dropped.values, "palette": torch.rand(2, 275)}, dropped.keep_masks, 2)
        torch.testing.assert_close(model(x, t, dropped), model(x, t, other))


def test_a_batch_equals_its_singles_and_unknown_conditions_are_refused():
    model = tiny_model()
    conditions = fake_conditions(3)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 400, 999])
    with torch.no_grad():
        batch = model(x, t, conditions)
        for i in range(3):
            single = Conditions({n: ({k: v[i:i + 1] for k, v in val.items()} if isinstance(val, dict) else val[i:i + 1])
                                 for n, val in conditions.values.items()})
            torch.testing.assert_close(batch[i:i + 1], model(x[i:i + 1], t[i:i + 1], single), atol=1e-5, rtol=1e-4)
    model_without_depth = ComposerUNet(**model_kwargs("tiny", TINY, {k: v for k, v in SPECS.items() if k != "depth"}))
    with pytest.raises(ValueError, match="not trained with condition"):
        model_without_depth(x, t, conditions)


def test_save_and_load_give_identical_outputs(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "unet")
    assert (tmp_path / "unet" / "composer_unet.safetensors").is_file()
    loaded = ComposerUNet.from_pretrained(tmp_path / "unet").eval()
    conditions, x, t = fake_conditions(2), torch.randn(2, 3, 16, 16), torch.tensor([5, 50])
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys() and all(torch.equal(state[k], loaded_state[k]) for k in state)
    with torch.no_grad():  # identical weights; kernels may differ in the last bit with tensor layout
        torch.testing.assert_close(model(x, t, conditions), loaded(x, t, conditions), atol=1e-5, rtol=0)


def test_guidance_weight_one_is_unguided_and_batched_equals_separate():
    model = tiny_model()
    conditions = fake_conditions(2)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor(250)
    with torch.no_grad():
        plain = model(x, t, conditions)
        torch.testing.assert_close(guided_prediction(model, x, t, conditions, 1.0), plain, atol=1e-5, rtol=1e-4)
        empty = model(x, t, conditions.subset([]))
        guided = guided_prediction(model, x, t, conditions, 3.0)
        torch.testing.assert_close(guided, empty + 3.0 * (plain - empty), atol=1e-5, rtol=1e-4)
        away = model(x, t, conditions.subset(["caption"]))
        torch.testing.assert_close(guided_prediction(model, x, t, conditions, 2.0, away_from=["caption"]),
                                   away + 2.0 * (plain - away), atol=1e-5, rtol=1e-4)
        only_palette = model(x, t, conditions.subset(["palette"]))
        only_sketch = model(x, t, conditions.subset(["sketch"]))
        expected = empty + 2.0 * (only_palette - empty) + 0.5 * (only_sketch - empty)
        torch.testing.assert_close(composed_prediction(model, x, t, conditions, {"palette": 2.0, "sketch": 0.5}), expected,
                                   atol=1e-5, rtol=1e-4)


def test_an_anchored_condition_is_held_in_every_branch_and_not_guided():
    model = tiny_model()
    conditions = fake_conditions(2).subset(["masking", "palette", "sketch"])
    x, t = torch.randn(2, 3, 16, 16), torch.tensor(250)
    with torch.no_grad():
        plain = model(x, t, conditions)
        masking = model(x, t, conditions.subset(["masking"]))
        empty = model(x, t, conditions.subset([]))
        held = Guidance(model, scale=3.0, anchor=["masking"])
        torch.testing.assert_close(held(x, t, conditions), masking + 3.0 * (plain - masking), atol=1e-5, rtol=1e-4)
        unheld = Guidance(model, scale=3.0)(x, t, conditions)
        torch.testing.assert_close(unheld, empty + 3.0 * (plain - empty), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(held(x, t, conditions), unheld, atol=1e-4)
        # masking alone and anchored: nothing left to guide, one plain forward
        alone = conditions.subset(["masking"])
        torch.testing.assert_close(held(x, t, alone), model(x, t, alone), atol=1e-5, rtol=1e-4)
        # per-condition weights compose on top of the anchor; a weighted anchor is guided by its weight
        with_palette = model(x, t, conditions.subset(["masking", "palette"]))
        weighted = Guidance(model, weights={"palette": 2.0}, anchor=["masking"])(x, t, conditions)
        torch.testing.assert_close(weighted, masking + 2.0 * (with_palette - masking), atol=1e-5, rtol=1e-4)
        own = Guidance(model, weights={"masking": 2.0}, anchor=["masking"])(x, t, conditions)
        torch.testing.assert_close(own, empty + 2.0 * (masking - empty), atol=1e-5, rtol=1e-4)


def test_guidance_rescale_moves_the_spread_to_the_conditional_predictions():
    model = tiny_model()
    conditions = fake_conditions(2)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor(250)
    with torch.no_grad():
        plain = model(x, t, conditions)
        guided = guided_prediction(model, x, t, conditions, 3.0)
        full = Guidance(model, scale=3.0, rescale=1.0)(x, t, conditions)
        half = Guidance(model, scale=3.0, rescale=0.5)(x, t, conditions)
        torch.testing.assert_close(Guidance(model, scale=3.0, rescale=0.0)(x, t, conditions), guided)
    dims = (1, 2, 3)
    # phi = 1: each sample's std equals the conditional prediction's, its direction is the guided one's
    torch.testing.assert_close(full.std(dim=dims), plain.std(dim=dims), atol=1e-5, rtol=1e-4)
    ratio = full / guided
    torch.testing.assert_close(ratio, ratio.flatten(1)[:, :1, None, None].expand_as(ratio), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(full.std(dim=dims), guided.std(dim=dims), rtol=1e-2)  # guidance did widen it
    torch.testing.assert_close(half, 0.5 * full + 0.5 * guided, atol=1e-5, rtol=1e-4)  # phi mixes linearly


@pytest.mark.parametrize("rescale", [-0.1, 1.5, float("nan")])
def test_guidance_rescale_outside_zero_to_one_is_refused(rescale):
    with pytest.raises(ValueError, match="between 0 and 1"):
        Guidance(tiny_model(), scale=3.0, rescale=rescale)


def test_guidance_rescale_with_condition_weights_is_refused():
    with pytest.raises(ValueError, match="per-condition weights"):
        Guidance(tiny_model(), weights={"palette": 2.0}, rescale=0.7)


def test_dropout_frequencies_match_their_probabilities():
    policy = DropoutPolicy(default_p=0.5, per_condition={"intensity": 0.7}, p_drop_all=0.1, p_keep_all=0.1,
                           p_only={"slots": 0.1})
    n = 40_000
    keep = policy.sample(["palette", "intensity", "slots", "depth"], n, torch.Generator().manual_seed(0))
    stacked = torch.stack(list(keep.values()), dim=1)

    def check(observed, p):
        se = (p * (1 - p) / n) ** 0.5
        assert abs(float(observed) - p) < 5 * se, (float(observed), p)

    independent = 1 - 0.1 - 0.1 - 0.1
    check((~stacked).all(1).float().mean(), 0.1 + independent * 0.5 * 0.7 * 0.5 * 0.5)
    check(stacked.all(1).float().mean(), 0.1 + independent * 0.5 * 0.3 * 0.5 * 0.5)
    check(keep["palette"].float().mean(), 0.1 + independent * 0.5)
    check(keep["intensity"].float().mean(), 0.1 + independent * 0.3)
    check(keep["slots"].float().mean(), 0.1 + 0.1 + independent * 0.5)
    only_slots = keep["slots"] & ~keep["palette"] & ~keep["intensity"] & ~keep["depth"]
    check(only_slots.float().mean(), 0.1 + independent * 0.5 * 0.5 * 0.7 * 0.5)
    assert torch.equal(policy.sample(["a"], 10, torch.Generator().manual_seed(3))["a"],
                       policy.sample(["a"], 10, torch.Generator().manual_seed(3))["a"])
    with pytest.raises(ValueError, match="must not exceed 1"):
        DropoutPolicy(p_drop_all=0.6, p_keep_all=0.6)


def test_precision_choices():
    assert resolve_precision("fp32", "cpu") == torch.float32
    assert resolve_precision("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="emulated"):
        resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_follows_the_cpu_and_a_forced_emulated_bf16_is_warned_about(monkeypatch, native):
    import composer.runtime as runtime

    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: native)
    assert runtime.resolve_precision("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert runtime.accelerate_mixed_precision("auto", "cpu") == ("bf16" if native else "no")
    line = runtime.describe_precision("bf16", "cpu")
    assert ("WARNING" in line) is (not native) and "\n" not in line
    assert runtime.describe_precision("no", "cpu").startswith("precision: fp32")


def test_loading_weights_of_another_architecture_is_a_clear_error(tmp_path):
    """Missing tensors are never left randomly initialised (diffusers' default is a warning)."""
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    model.save_pretrained(tmp_path / "unet")
    assert ComposerUNet.from_pretrained(tmp_path / "unet").state_dict().keys() == model.state_dict().keys()
    weights_file = tmp_path / "unet" / "composer_unet.safetensors"
    weights = load_file(weights_file)
    dropped = sorted(weights)[0]
    del weights[dropped]
    save_file(weights, weights_file)
    with pytest.raises(ValueError, match=f"do not match.*missing keys: {dropped}"):
        ComposerUNet.from_pretrained(tmp_path / "unet")


def test_a_plain_diffusers_unet_refuses_our_folder_instead_of_returning_random_weights(tmp_path):
    from diffusers import UNet2DConditionModel

    tiny_model().save_pretrained(tmp_path / "unet")
    with pytest.raises(OSError, match="diffusion_pytorch_model"):
        UNet2DConditionModel.from_pretrained(tmp_path / "unet")


def test_a_wave_one_config_is_upgraded_to_the_same_routes():
    """Folders written before routing by spec (per-name dims) load into the same modules."""
    from composer.models.unet import upgrade_config

    legacy = {"sample_size": 16, "block_out_channels": [16, 32], "attention_heads": [1, 2], "context_dim": 16,
              "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "local_embed_channels": 4,
              "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "caption_dim": 16, "word_dim": 12,
              "image_embedding_dim": 16, "palette_dim": 275, "slot_dim": 8,
              "local_channels": {"sketch": 1, "instances": 5, "depth": 1, "intensity": 1, "masking": 4},
              "num_image_tokens": 8, "num_palette_tokens": 8}
    upgraded = ComposerUNet.from_config(upgrade_config(legacy))
    assert upgraded.state_dict().keys() == tiny_model().state_dict().keys()
