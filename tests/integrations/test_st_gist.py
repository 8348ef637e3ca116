"""f2llm's CachedGISTEmbedLoss against sentence-transformers' CachedGISTEmbedLoss, the independent reference: the
same loss and every parameter gradient to 1e-5, for pairs and triplets, both margin strategies, contrast_anchors /
contrast_positives on and off, and guides that differ from the model (other weights; re-tokenized; unpackable).

Models are random tiny BERTs (2 layers, width 32) in the packaged MiniLM's Transformer module (its tokenizer), as in
test_st_cmnrl_options.py: no hub access, a loss with its gradients in well under a second on one core.
"""

from __future__ import annotations

import logging

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss as STLoss
from torch import Tensor

from f2llm.integrations.sentence_transformers import CachedGISTEmbedLoss
from tests.integrations.st_helpers import assert_same as assert_equal_to_reference
from tests.integrations.st_helpers import loss_and_grads, rel, tiny_model

ANCHORS = ["a man sleeps", "two dogs run in a field", "the sky is blue", "she plays the violin", "rain", "a red car",
           "kids build a sand castle"]  # fmt: skip
POSITIVES = ["someone is asleep", "animals are outside", "a clear day", "music is played", "it is wet",
             "a vehicle", "children at the beach"]  # fmt: skip
NEGATIVES = ["a man runs a marathon", "the cats sleep indoors", "a storm at night", "nobody makes a sound",
             "a dry desert", "a blue bicycle", "adults in an office"]  # fmt: skip
PAIRS = (ANCHORS, POSITIVES)
TRIPLETS = (ANCHORS, POSITIVES, NEGATIVES)


def assert_same(ours: tuple[Tensor, dict[str, Tensor]], ref: tuple[Tensor, dict[str, Tensor]], tol=1e-5) -> None:
    # The guide's similarities of these random models lie in about [0.8, 0.95]: the margins are chosen so that it
    # masks some candidates, not all (every candidate but the positive masked would give a zero loss).
    assert ref[0].abs() > 1e-2
    assert_equal_to_reference(ours, ref, tol)


@pytest.fixture(scope="module")
def guide() -> SentenceTransformer:
    return tiny_model(seed=1)


OPTIONS = {
    "absolute": {},
    "absolute margin 0.02": dict(margin=0.02),
    "relative margin 0.02": dict(margin_strategy="relative", margin=0.02),
    "relative margin -0.03, no anchor contrast": dict(margin_strategy="relative", margin=-0.03, contrast_anchors=False),
    "no positive contrast": dict(contrast_positives=False),
    "no anchor or positive contrast, temperature 0.05": dict(
        contrast_anchors=False, contrast_positives=False, temperature=0.05
    ),
    "token budget": dict(mini_batch_num_tokens=24),
}


@pytest.mark.parametrize("cols", [PAIRS, TRIPLETS], ids=["pairs", "triplets"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_matches_sentence_transformers(model, guide, cols, options) -> None:
    """Loss and gradients equal sentence-transformers' (mini-batches of 3 over 7 rows: uneven blocks)."""
    kwargs = dict(mini_batch_size=3, **options)
    ref = loss_and_grads(model, STLoss(model, guide, **kwargs), cols)
    ours = loss_and_grads(model, CachedGISTEmbedLoss(model, guide, **kwargs), cols)
    assert_same(ours, ref)


def test_guide_masks_some_candidates(model, guide) -> None:
    """The guide is not a no-op in these tests: a margin that masks nothing gives another loss."""
    cols = [model.preprocess(list(c)) for c in TRIPLETS]
    with torch.no_grad():
        masking = CachedGISTEmbedLoss(model, guide, mini_batch_size=3)(cols, None)
        lenient = CachedGISTEmbedLoss(model, guide, mini_batch_size=3, margin=-10.0)(cols, None)
    assert abs(masking.item() - lenient.item()) > 1e-3


def test_scaled_backward_and_eval(model, guide) -> None:
    """The gradient handed to the loss scales pass 2 (gradient accumulation, fp16 loss scale); without grad the
    loss is sentence-transformers'."""
    kwargs = dict(mini_batch_size=4, margin=0.02)
    ref = loss_and_grads(model, STLoss(model, guide, **kwargs), TRIPLETS, scale=0.25)
    assert_same(loss_and_grads(model, CachedGISTEmbedLoss(model, guide, **kwargs), TRIPLETS, scale=0.25), ref)
    cols = [model.preprocess(list(c)) for c in TRIPLETS]
    with torch.no_grad():
        expected = STLoss(model, guide, **kwargs)(cols, None)
        got = CachedGISTEmbedLoss(model, guide, **kwargs)(cols, None)
    assert rel(got, expected) < 1e-5


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_retokenized_guide(model, pooling, caplog) -> None:
    """A guide with a shorter max_seq_length is fed re-tokenized texts (sentence-transformers' must_retokenize),
    packed (mean pooling) or, unpackable (max pooling), through its padded forward, which a warning names."""
    guide = tiny_model(seed=2, pooling=pooling, normalize=False)
    guide.max_seq_length = 8  # also truncates the longer texts
    kwargs = dict(mini_batch_size=3)
    ref_loss = STLoss(model, guide, **kwargs)
    assert ref_loss.must_retokenize
    ref = loss_and_grads(model, ref_loss, TRIPLETS)
    with caplog.at_level(logging.WARNING):
        ours = loss_and_grads(model, CachedGISTEmbedLoss(model, guide, **kwargs), TRIPLETS)
    assert ("cannot pack the guide" in caplog.text) == (pooling == "max")
    assert_same(ours, ref)


def test_guide_is_the_model(model) -> None:
    """The guide may be the trained model itself (no gradient flows through its guide role)."""
    kwargs = dict(mini_batch_size=3, margin=0.01)
    ref = loss_and_grads(model, STLoss(model, model, **kwargs), PAIRS)
    assert_same(loss_and_grads(model, CachedGISTEmbedLoss(model, model, **kwargs), PAIRS), ref)


def test_frozen_guide_gets_no_gradient(model, guide) -> None:
    guide.zero_grad(set_to_none=True)
    loss_and_grads(model, CachedGISTEmbedLoss(model, guide, mini_batch_size=3), TRIPLETS)
    assert all(p.grad is None for p in guide.parameters())
