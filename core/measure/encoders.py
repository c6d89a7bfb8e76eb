"""How good a pruned encoder is, offline: fidelity to the dense encoder, labelled-set accuracy, size,
FLOPs and measured throughput.

- feature fidelity: mean cosine between dense and pruned embeddings (normed CLS / pooled sentence
  vector) and between their tokens (patch tokens for images), on evaluation examples;
- kNN (cosine similarity, temperature-weighted vote as DINO's ``eval_knn``) and a linear probe
  (scikit-learn logistic regression) on a labelled set's held-out split, features of the encoder
  under test; train and test examples never come from the calibration crops;
- text encoders: cosine of sentence embeddings and top-k retrieval agreement with the dense model;
- images (or texts) per second measured with ``core.speed.repeat_until_known`` (median, quartiles);
- ``quick_knn``: the kNN accuracy on a small labelled subset, seconds on a CPU, so the dashboard shows a
  pruned encoder's quality beside the dense one's right after a prune.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from core.data.images import labelled_images, stratified_split
from core.measure.speed import repeat_until_known, spread
from core.models.counts import count_params, encoder_flops
from core.models.encoders import embed, encoder_forward
from core.models.forward import batches
from core.progress import check_stop


@torch.no_grad()
def embeddings(model: nn.Module, data: torch.Tensor, batch_size: int = 64,
               stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """L2-normalised embeddings (N, H) of examples (N, ...) in fp32."""
    out = []
    for batch in batches(data, batch_size):
        check_stop(stop, "The evaluation was stopped.")
        out.append(F.normalize(embed(model, batch).float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def feature_fidelity(dense: nn.Module, pruned: nn.Module, data: torch.Tensor, batch_size: int = 32) -> dict:
    """Mean cosine of the embeddings (``embedding_cosine``) and of all non-CLS output tokens
    (``token_cosine``: patch tokens, or word tokens for text) between the two encoders."""
    emb, tok, n_tok = 0.0, 0.0, 0
    for batch in batches(data, batch_size):
        a, b = encoder_forward(dense, batch), encoder_forward(pruned, batch)
        emb += float(F.cosine_similarity(_pooled(dense, a), _pooled(pruned, b), dim=-1).sum())
        ta, tb = a.last_hidden_state[:, 1:].float(), b.last_hidden_state[:, 1:].float()  # (B, N, H)
        tok += float(F.cosine_similarity(ta, tb, dim=-1).sum())
        n_tok += ta.shape[0] * ta.shape[1]
    return {"embedding_cosine": emb / data.shape[0], "token_cosine": tok / max(1, n_tok)}


def _pooled(model: nn.Module, out) -> torch.Tensor:
    model_type = model.config.model_type
    if model_type == "clip_vision_model":
        return out.pooler_output.float()
    if model_type == "bert":
        return out.last_hidden_state.mean(dim=1).float()
    return out.last_hidden_state[:, 0].float()


def knn_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                 k: int = 10, temperature: float = 0.07) -> float:
    """Weighted kNN top-1 accuracy on normalised features: the k most cosine-similar training
    examples vote with weight exp(sim / T) (DINO's eval_knn)."""
    sims = test @ train.t()  # (N_test, N_train)
    top, index = sims.topk(min(k, train.shape[0]), dim=1)
    votes = torch.zeros(test.shape[0], int(train_labels.max()) + 1)
    votes.scatter_add_(1, train_labels[index], (top / temperature).exp())
    return float((votes.argmax(1) == test_labels).float().mean())


def linear_probe_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                          test_labels: torch.Tensor, seed: int = 0) -> float:
    """Accuracy of a logistic-regression probe (scikit-learn, L2, C = 1) trained on ``train``."""
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(max_iter=2000, random_state=seed)
    probe.fit(train.numpy(), train_labels.numpy())
    return float((torch.from_numpy(probe.predict(test.numpy())) == test_labels).float().mean())


def retrieval_agreement(dense: torch.Tensor, pruned: torch.Tensor, k: int = 5) -> float:
    """Mean overlap of each example's top-k nearest neighbours (itself excluded) under the two
    encoders' normalised embeddings (N, H): 1 = same neighbours."""
    k = min(k, dense.shape[0] - 1)
    eye = torch.eye(dense.shape[0], dtype=torch.bool)
    near_d = (dense @ dense.t()).masked_fill(eye, -2).topk(k, dim=1).indices
    near_p = (pruned @ pruned.t()).masked_fill(eye, -2).topk(k, dim=1).indices
    same = (near_d.unsqueeze(2) == near_p.unsqueeze(1)).any(dim=2).float()  # (N, k)
    return float(same.mean())


def labelled_scores(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, train: torch.Tensor,
                    test: torch.Tensor, batch_size: int = 64, k: int = 10) -> dict:
    """kNN and linear-probe accuracy of ``model``'s features on one labelled set (normalised pixels)."""
    features = embeddings(model, images, batch_size)
    return {"knn": knn_accuracy(features[train], labels[train], features[test], labels[test], k),
            "probe": linear_probe_accuracy(features[train], labels[train], features[test], labels[test])}


@torch.no_grad()
def throughput(model: nn.Module, batch: torch.Tensor, *, min_repeats: int = 5, max_repeats: int = 15,
               stop: Callable[[], bool] | None = None) -> dict:
    """Examples per second of a forward on ``batch`` (one warm-up, then timed repeats until the spread
    is known): median and the inter-quartile range of seconds per batch."""
    model.eval()
    encoder_forward(model, batch)  # warm-up

    def once() -> float:
        start = time.perf_counter()
        encoder_forward(model, batch)
        return time.perf_counter() - start

    s = spread(repeat_until_known(once, min_repeats=min_repeats, max_repeats=max_repeats, stop=stop))
    return {"examples_per_second": batch.shape[0] / s.median, "seconds_median": s.median, "seconds_q1": s.q1,
            "seconds_q3": s.q3, "repeats": s.n, "batch": int(batch.shape[0]), "threads": torch.get_num_threads()}


# the quick accuracy check after a prune: per_class labelled images of each class at size px (seconds on a CPU)
QUICK_KNN = {"dataset": "digits", "per_class": 30, "size": 56}


def eval_size(model: nn.Module, wanted: int) -> int:
    """The image side to evaluate ``model`` at: ``wanted`` for DINOv2 (it interpolates its position
    embeddings), the configured ``image_size`` for ViT / CLIP (their position table is fixed)."""
    if model.config.model_type == "dinov2":
        return int(wanted)
    return int(getattr(model.config, "image_size", wanted))


@torch.no_grad()
def quick_knn(models: dict[str, nn.Module], preprocess, *, dataset: str = QUICK_KNN["dataset"],
              per_class: int = QUICK_KNN["per_class"], size: int = QUICK_KNN["size"], seed: int = 0, k: int = 10,
              batch_size: int = 64, stop: Callable[[], bool] | None = None) -> dict:
    """kNN top-1 accuracy (:func:`knn_accuracy`) of each image encoder in ``models`` on a small seeded
    subset of a labelled set (``per_class`` images of every class, 30 % of them the test side), so a
    pruned encoder's quality reads beside the dense one's in seconds. Returns {"accuracy": {name: acc},
    "stderr": {name: binomial SE}, "chance", "examples", "test", "dataset", "size"}. The images were
    never calibrated on; small upsampled digits are a coarse yardstick, not a benchmark."""
    images, labels = labelled_images(dataset, eval_size(next(iter(models.values())), size))
    rng = torch.Generator().manual_seed(int(seed))
    picked = torch.cat([members[torch.randperm(members.numel(), generator=rng)[:per_class]]
                        for members in (torch.nonzero(labels == c).flatten() for c in labels.unique().tolist())])
    images, labels = images[picked], labels[picked]
    train, test = stratified_split(labels, seed=seed)
    pixels = preprocess.normalize(images)
    accuracy = {}
    for name, model in models.items():
        features = embeddings(model, pixels, batch_size, stop=stop)
        accuracy[name] = knn_accuracy(features[train], labels[train], features[test], labels[test], k)
    n = int(test.numel())
    return {"accuracy": accuracy, "stderr": {m: math.sqrt(a * (1 - a) / n) for m, a in accuracy.items()},
            "chance": 1.0 / int(labels.unique().numel()), "examples": int(labels.numel()), "test": n,
            "dataset": dataset, "size": int(images.shape[-1])}


def size_report(model: nn.Module, tokens: int) -> dict:
    """Parameters (total, MLP) and analytic GFLOPs per example."""
    counts = count_params(model)
    return {**counts, "gflops": encoder_flops(model, tokens) / 1e9}
