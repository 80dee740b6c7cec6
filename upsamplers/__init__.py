"""The cascade's upsampling stages (64 -> 256 -> 1024): an sr preset of ComposerUNet plus a stage.

    from upsamplers.presets import build_upsampler          # the network (composer.models.config PRESETS)
    from upsamplers.stage import UpsamplerStage, StageSettings   # sampling with the shared loop
    from upsamplers.training import UpsamplerConditioner    # the low-res input made from training crops

This package knows the models and the diffusion maths, never a pipeline or a trainer.
"""
