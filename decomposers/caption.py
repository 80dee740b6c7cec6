"""caption: the CLIP text tower's sentence embedding (global) and word embeddings (tokens)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

from composer.conditions import GLOBAL, TOKENS, ConditionSpec
from decomposers.base import Decomposer
from decomposers.clip import load_open_clip, open_clip_name
from decomposers.registry import register_decomposer


@register_decomposer
class CaptionDecomposer(Decomposer):
    """Sentence and word embeddings of each image's caption, from an open_clip text tower.

    forward(images, captions=list[str]) -> {
        "sentence": (B, D) the pooled, projected, L2-normalised text embedding,
        "words": (B, L, W) the text transformer's final hidden states after ``ln_final`` (zero after the
                 end token),
        "words_mask": (B, L) bool, True for real tokens (start token .. end token),
    }
    The images are only used for the batch size and device. Paper: CLIP ViT-L/14.
    """

    name = "caption"
    kinds = (GLOBAL, TOKENS)

    def __init__(self, model_name: str = "ViT-L-14", pretrained: str | None = None,
                 model_config_file: str | None = None, base_dir: str | None = None):
        super().__init__()
        import open_clip

        self.model_name = model_name
        self.clip = load_open_clip(model_name, pretrained, model_config_file=model_config_file,
                                   option="decomposers.options.caption.pretrained", base_dir=base_dir)
        if not hasattr(self.clip, "token_embedding"):
            raise ValueError(f"{model_name} has a custom text tower; the caption decomposer supports open_clip CLIP models")
        self.tokenizer = open_clip.get_tokenizer(open_clip_name(model_name, pretrained))
        self.context_length = int(self.clip.positional_embedding.shape[0])

    @property
    def spec(self) -> ConditionSpec:
        projection = self.clip.text_projection
        dim = projection.shape[1] if isinstance(projection, torch.Tensor) else projection.out_features
        return ConditionSpec(self.name, self.kinds, int(dim), token_dim=int(self.clip.ln_final.normalized_shape[0]),
                             num_tokens=self.context_length, vector_key="sentence",
                             tokens_key="words", mask_key="words_mask")

    @torch.no_grad()
    def forward(self, images: torch.Tensor, captions: list[str] | None = None, **context: Any) -> dict[str, torch.Tensor]:
        if captions is None:
            raise ValueError("the caption decomposer needs captions=list[str] (one per image)")
        if len(captions) != images.shape[0]:
            raise ValueError(f"got {len(captions)} captions for {images.shape[0]} images")
        tokens = self.tokenizer(list(captions), context_length=self.context_length).to(self.clip.positional_embedding.device)
        clip = self.clip
        eot = tokens.argmax(dim=-1)  # the end token has the largest id in CLIP's vocabulary
        # The text tower is causal: states up to the end token do not depend on the padding after it, so the
        # batch runs only up to its longest caption (3-4x less work for typical captions than 77 tokens).
        length = int(eot.max()) + 1
        x = clip.token_embedding(tokens[:, :length]) + clip.positional_embedding[:length]
        attn_mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
        x = clip.transformer(x, attn_mask=attn_mask)
        states = clip.ln_final(x)
        # pool and project exactly as open_clip's encode_text does (argmax pooling at the end token)
        pooled = text_global_pool(states, tokens[:, :length], clip.text_pool_type,
                                  eos_token_id=getattr(clip, "text_eos_id", None))
        projection = clip.text_projection
        if projection is not None:
            pooled = projection(pooled) if isinstance(projection, torch.nn.Linear) else pooled @ projection
        sentence = F.normalize(pooled, dim=-1)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        mask = positions[None] <= eot[:, None]
        words = torch.zeros(tokens.shape[0], tokens.shape[1], states.shape[-1], dtype=states.dtype, device=states.device)
        words[:, :length] = states
        words = words * mask[..., None]  # padding positions are zero, whatever the batch
        return {"sentence": sentence.float(), "words": words.float(), "words_mask": mask}

    def visualize(self, rep: dict[str, torch.Tensor]) -> torch.Tensor:
        """Word embeddings as a heat map (tokens down, features across), masked tokens black."""
        words = rep["words"] * rep["words_mask"][..., None]
        scale = words.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)
        heat = (words / scale * 0.5 + 0.5) * rep["words_mask"][..., None]
        heat = F.interpolate(heat[:, None], size=(128, 128), mode="nearest")
        return heat.repeat(1, 3, 1, 1).clamp(0, 1)
