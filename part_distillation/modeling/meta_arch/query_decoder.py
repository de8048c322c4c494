"""Mask2Former's masked-attention decoder that also returns the query features of every prediction set.

The part models need the embedding f_j of each query q_j that their heads read: the stage-3 ranking
clusters it into prototypes and the stage-4 part classifiers classify it (PartDistillation, Cho et al.
2023, supp. "Class-specific part ranking"). It is the decoder's LayerNorm-ed output, the input of both ``class_embed``
and
``mask_embed`` (the reference code's ``decoder_output``).

:class:`QueryFeatureTransformerDecoder` is :class:`MultiScaleMaskedTransformerDecoder` with the same
modules, parameters and state-dict names (a checkpoint of one loads into the other), whose ``forward``
adds ``"query_feats"`` [B, Q, D] to the final prediction and to every ``aux_outputs`` entry. Select it
with ``MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME "QueryFeatureTransformerDecoder"`` (our default).
"""

import torch
from torch.nn import functional as F

from ...utils.compat import import_mask2former

import_mask2former()
from mask2former.modeling.transformer_decoder.mask2former_transformer_decoder import (  # noqa: E402
    TRANSFORMER_DECODER_REGISTRY,
    MultiScaleMaskedTransformerDecoder,
)

__all__ = ["QueryFeatureTransformerDecoder"]


@TRANSFORMER_DECODER_REGISTRY.register()
class QueryFeatureTransformerDecoder(MultiScaleMaskedTransformerDecoder):
    """Masked-attention decoder whose every prediction set carries its query features (module doc)."""

    def forward(self, x, mask_features, mask=None):
        # The loop of Mask2Former (Cheng et al. 2022, "Masked attention"): per layer, masked cross-attention to one
        # feature level (round robin), self-attention, FFN, then the heads predict from the normed queries.
        del mask  # Mask2Former does not mask the padded region either
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(x)}")
        sources, positions, sizes = [], [], []
        for level in range(self.num_feature_levels):
            sizes.append(x[level].shape[-2:])
            positions.append(self.pe_layer(x[level], None).flatten(2).permute(2, 0, 1))  # HW×B×C
            projected = self.input_proj[level](x[level]).flatten(2) + self.level_embed.weight[level][None, :, None]
            sources.append(projected.permute(2, 0, 1))
        batch = sources[0].shape[1]
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, batch, 1)  # Q×B×C
        queries = self.query_feat.weight.unsqueeze(1).repeat(1, batch, 1)

        sets = [self.predict(queries, mask_features, sizes[0])]
        for layer in range(self.num_layers):
            level = layer % self.num_feature_levels
            attn_mask = sets[-1][3]
            # a query whose mask is empty everywhere attends to every location (as Mask2Former)
            attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
            queries = self.transformer_cross_attention_layers[layer](
                queries,
                sources[level],
                memory_mask=attn_mask,
                memory_key_padding_mask=None,
                pos=positions[level],
                query_pos=query_pos,
            )
            queries = self.transformer_self_attention_layers[layer](
                queries, tgt_mask=None, tgt_key_padding_mask=None, query_pos=query_pos
            )
            queries = self.transformer_ffn_layers[layer](queries)
            sets.append(self.predict(queries, mask_features, sizes[(layer + 1) % self.num_feature_levels]))

        outputs = [{"pred_logits": c, "pred_masks": m, "query_feats": f} for c, m, f, _ in sets]
        final = outputs[-1]
        final["aux_outputs"] = outputs[:-1]
        return final

    def predict(self, queries, mask_features, attn_mask_size):
        """Class logits [B, Q, K+1], mask logits [B, Q, H, W], query features [B, Q, D] and the next
        layer's attention mask of queries ``queries`` (Q×B×D)."""
        feats = self.decoder_norm(queries).transpose(0, 1)
        class_logits = self.class_embed(feats)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(feats), mask_features)
        # attention mask at the next level's size: attend only where the predicted mask is on (p ≥ 0.5)
        resized = F.interpolate(mask_logits, size=attn_mask_size, mode="bilinear", align_corners=False)
        attn_mask = resized.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1) < 0.5
        return class_logits, mask_logits, feats, attn_mask.bool().detach()
