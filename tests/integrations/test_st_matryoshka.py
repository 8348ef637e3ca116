"""f2llm's MatryoshkaLoss against sentence-transformers' MatryoshkaLoss, the independent reference.

sentence-transformers' class computes the inner loss once per dimension (its ForwardDecorator / CachedLossDecorator
loop over embeddings cut and normalized again); f2llm's takes every dimension in one pass of the fused loss. Around
f2llm's CachedMultipleNegativesRankingLoss and MultipleNegativesRankingLoss, each compared with the same
sentence-transformers class: loss and every parameter gradient to 1e-5, for every option (the ones the fused op
takes and the ones computed level by level), dims without the full size, repeated dims, custom weights and a random
subset of dims per step (the same Python draw). Also: one fused call for all levels, the warning when
sentence-transformers' MatryoshkaLoss wraps an f2llm loss, any other inner loss (CachedGISTEmbedLoss) left to
sentence-transformers' loop, bf16 autocast's dtype, and two SentenceTransformerTrainer steps.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch
from sentence_transformers.sentence_transformer import losses as st_losses
from sentence_transformers.util import dot_score

from f2llm.integrations import sentence_transformers as integration
from tests.integrations.st_helpers import (
    ANCHORS,
    NEGATIVES,
    POSITIVES,
    assert_same,
    features,
    loss_and_grads,
    tiny_model,
)

TRIPLETS = (ANCHORS, POSITIVES, NEGATIVES)
DIMS = [32, 16, 8]  # the tiny model's width is 32

OPTIONS = {
    "query_to_doc": {},
    "dot_score": dict(similarity_fct=dot_score),
    "joint doc_to_query": dict(directions=("query_to_doc", "doc_to_query")),
    "per_direction doc_to_query": dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
    "query_to_query, doc_to_doc": dict(directions=("query_to_doc", "query_to_query", "doc_to_doc")),
    "hardness": dict(hardness_mode="all_negatives", hardness_strength=2.0),
}
KINDS = ("CachedMultipleNegativesRankingLoss", "MultipleNegativesRankingLoss")


def inner(module, kind: str, model, **options):
    extra = {"mini_batch_size": 3} if kind.startswith("Cached") else {}
    return getattr(module, kind)(model, **extra, **options)


def both(model, kind: str, options: dict, *matryoshka, cols=TRIPLETS, seed: int = 0):
    """(loss, gradients) of f2llm's and of sentence-transformers' MatryoshkaLoss around their own ``kind``, Python's
    random seeded alike before each (n_dims_per_step draws from it)."""
    random.seed(seed)
    ours = loss_and_grads(model, integration.MatryoshkaLoss(model, inner(integration, kind, model, **options),
                                                            *matryoshka), cols)  # fmt: skip
    random.seed(seed)
    ref = loss_and_grads(model, st_losses.MatryoshkaLoss(model, inner(st_losses, kind, model, **options),
                                                         *matryoshka), cols)  # fmt: skip
    return ours, ref


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_matches_sentence_transformers(model, kind: str, options: dict) -> None:
    ours, ref = both(model, kind, options, DIMS)
    assert_same(ours, ref)


LEVELS = {
    "weights": ([32, 16, 8], [1.0, 0.5, 2.0], -1),
    "no full size, a repeated dim": ([16, 8, 8], [1.0, 2.0, 0.5], -1),
    "2 of 4 dims per step": ([32, 24, 16, 8], None, 2),
    "a zero weight": ([32, 16, 8], [1.0, 0.0, 1.0], -1),
}


@pytest.mark.parametrize("levels", LEVELS.values(), ids=LEVELS.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_levels_match_sentence_transformers(model, kind: str, levels: tuple) -> None:
    for seed in (0, 1):  # n_dims_per_step draws other dims with another seed
        ours, ref = both(model, kind, {}, *levels, seed=seed)
        assert_same(ours, ref)


def test_every_level_in_one_fused_call(model, monkeypatch: pytest.MonkeyPatch) -> None:
    """query_to_doc: one infonce call with every level (the widest first); query_to_query: per level, no fused call
    with levels."""
    calls: list[dict] = []
    fused = integration.infonce

    def recording(q, c, targets, **kwargs):
        calls.append({"width": q.shape[1], **kwargs})
        return fused(q, c, targets, **kwargs)

    monkeypatch.setattr(integration, "infonce", recording)
    for kind in KINDS:
        calls.clear()
        loss = integration.MatryoshkaLoss(model, inner(integration, kind, model), [8, 32, 16], [3.0, 1.0, 2.0])
        loss(features(model, *TRIPLETS), None).backward()
        assert [(c["width"], c["matryoshka_dims"], c["matryoshka_weights"]) for c in calls] == [
            (32, (32, 16, 8), (1.0, 2.0, 3.0))
        ]
    calls.clear()
    wrapped = inner(integration, KINDS[0], model, directions=("query_to_doc", "query_to_query"))
    integration.MatryoshkaLoss(model, wrapped, DIMS)(features(model, *TRIPLETS), None).backward()
    assert calls == []


def test_levels_do_not_outlive_the_forward(model) -> None:
    """The inner loss used on its own after a MatryoshkaLoss step is the plain loss again."""
    plain = integration.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3)
    integration.MatryoshkaLoss(model, plain, DIMS)(features(model, *TRIPLETS), None).backward()
    ref = st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3)
    assert_same(loss_and_grads(model, plain, TRIPLETS), loss_and_grads(model, ref, TRIPLETS))


@pytest.mark.parametrize("kind", KINDS)
def test_sentence_transformers_wrapper_still_right_and_says_so(model, kind: str, caplog) -> None:
    """sentence-transformers' MatryoshkaLoss around an f2llm loss: its per-dimension loop, the same numbers, and a
    warning naming f2llm's MatryoshkaLoss."""
    with caplog.at_level(logging.WARNING, logger=integration.__name__):
        ours = loss_and_grads(model, st_losses.MatryoshkaLoss(model, inner(integration, kind, model), DIMS), TRIPLETS)
    assert "f2llm.integrations.sentence_transformers.MatryoshkaLoss" in caplog.text
    ref = loss_and_grads(model, st_losses.MatryoshkaLoss(model, inner(st_losses, kind, model), DIMS), TRIPLETS)
    assert_same(ours, ref)


def test_other_inner_loss_is_sentence_transformers_loop(model) -> None:
    """CachedGISTEmbedLoss (per-row guide masks, not a fused loss) inside f2llm's MatryoshkaLoss: theirs."""
    guide = tiny_model(seed=1)
    ours = loss_and_grads(model, integration.MatryoshkaLoss(
        model, integration.CachedGISTEmbedLoss(model, guide, mini_batch_size=3), DIMS), TRIPLETS)  # fmt: skip
    ref = loss_and_grads(model, st_losses.MatryoshkaLoss(
        model, st_losses.CachedGISTEmbedLoss(model, guide, mini_batch_size=3), DIMS), TRIPLETS)  # fmt: skip
    assert_same(ours, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_loss_dtype(model, kind: str) -> None:
    results = []
    for module in (integration, st_losses):
        loss_fn = module.MatryoshkaLoss(model, inner(module, kind, model), DIMS)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(loss_fn(features(model, *TRIPLETS), None))
    ours, ref = results
    assert ours.dtype == ref.dtype == torch.bfloat16
    # bf16 embeddings on both sides: the losses agree to bf16's rounding of logits of size ~scale.
    assert abs(ours.float().item() - ref.float().item()) < 0.05 * abs(ref.float().item())


def test_trainer_steps_match_sentence_transformers(tmp_path: Path) -> None:
    """Two SentenceTransformerTrainer steps (SGD: weights move by the gradients, which Adam's normalization would
    not keep proportional) with each MatryoshkaLoss around its cached loss, 2 of 3 dims drawn per step, end at the
    same weights."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    dataset = Dataset.from_dict(dict(zip(("anchor", "positive", "negative"), TRIPLETS, strict=True)))
    weights = []
    for module in (integration, st_losses):
        model = tiny_model(seed=2)
        for layer in model.modules():  # packing draws other dropout masks than the padded forward: dropout off
            if isinstance(layer, torch.nn.Dropout):
                layer.p = 0.0
        loss = module.MatryoshkaLoss(model, inner(module, KINDS[0], model), DIMS, n_dims_per_step=2)
        args = SentenceTransformerTrainingArguments(
            output_dir=str(tmp_path / module.__name__), per_device_train_batch_size=4, num_train_epochs=1,
            learning_rate=0.1, optim="sgd", seed=0, data_seed=0, report_to="none", save_strategy="no", logging_steps=1,
            dataloader_num_workers=0, use_cpu=True,
        )  # fmt: skip
        SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss).train()
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    ours, ref = weights
    start = tiny_model(seed=2).state_dict()
    assert any(not torch.equal(ref[k], start[k]) for k in ref)  # the steps moved the weights
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-6)
