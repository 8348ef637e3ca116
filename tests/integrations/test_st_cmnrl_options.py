"""Every option of f2llm's CachedMultipleNegativesRankingLoss, and the gradient-cache behaviours sentence-transformers'
own tests pin (their test_cmnrl.py and test_gradcache.py, v6), checked against f2llm's class.

The independent reference is sentence-transformers' class (or its non-cached MultipleNegativesRankingLoss): the
same loss and every parameter gradient to 1e-5, for each directions / partition_mode / hardness_mode / similarity
combination. The model is a random tiny BERT (2 layers, width 32) in the packaged MiniLM's Transformer module (its
tokenizer): no hub access, and a loss with its gradients in well under a second on one core.
"""

from __future__ import annotations

import functools
import gc
import weakref

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.normalize import Normalize
from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss as STLoss
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss
from sentence_transformers.sentence_transformer.modules import Dense, Pooling
from sentence_transformers.util import cos_sim, dot_score, euclidean_sim
from torch import Tensor

from f2llm.integrations import sentence_transformers as integration
from f2llm.integrations.sentence_transformers import CachedMultipleNegativesRankingLoss
from tests.integrations.st_helpers import (
    ANCHORS,
    NEGATIVES,
    POSITIVES,
    assert_same,
    features,
    gradients,
    grads_rel,
    loss_and_grads,
    rel,
    tiny_model,
)

# Texts of very different lengths, so a token budget gives uneven mini-batches.
VARIED_A = ["a", "an anchor with quite a few more words in it than the others", "c and d", "final anchor", "e", "f g"]
VARIED_B = ["short", "a positive that also has a much longer surface form here", "p", "another positive", "q r", "s"]
ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


@pytest.fixture
def train_model() -> SentenceTransformer:
    """A fresh model in train mode (dropout on): tests that train or mutate their model get their own."""
    return tiny_model(seed=1).train()


# ------------------------------------------------------------------------------------------------ every option
OPTIONS = {
    "default": {},
    "qd+dq joint": dict(directions=("query_to_doc", "doc_to_query")),
    "qd+dq per-direction scale 50": dict(
        directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction", scale=50.0
    ),
    "all directions": dict(directions=ALL_DIRECTIONS),
    "qd+qq": dict(directions=("query_to_doc", "query_to_query")),
    "qd+dd dot": dict(directions=("query_to_doc", "doc_to_doc"), similarity_fct=dot_score, scale=1.0),
    "in-batch hardness": dict(hardness_mode="in_batch_negatives", hardness_strength=9.0),
    "hard-negative hardness": dict(hardness_mode="hard_negatives", hardness_strength=5.0),
    "all-negative hardness, all directions": dict(
        hardness_mode="all_negatives", hardness_strength=5.0, directions=ALL_DIRECTIONS
    ),
    "all-negative hardness per-direction dot": dict(
        hardness_mode="all_negatives",
        hardness_strength=3.0,
        directions=("query_to_doc", "doc_to_query"),
        partition_mode="per_direction",
        similarity_fct=dot_score,
        scale=2.0,
    ),
    "hardness strength 0": dict(hardness_mode="hard_negatives", hardness_strength=0.0),
    "partial(cos_sim)": dict(similarity_fct=functools.partial(cos_sim)),
    "wrapped dot_score": dict(similarity_fct=lambda a, b: dot_score(a, b), scale=1.5),
}


@pytest.mark.parametrize("n_negatives", [0, 1])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_every_option_equals_sentence_transformers(model, options: dict, n_negatives: int) -> None:
    """Loss and every parameter gradient equal sentence-transformers' class, mini-batches of 3 over 7 rows (the
    last one short)."""
    cols = (ANCHORS, POSITIVES, NEGATIVES)[: 2 + n_negatives]
    ref = loss_and_grads(model, STLoss(model, mini_batch_size=3, **options), cols)
    assert_same(
        loss_and_grads(model, CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, **options), cols), ref
    )


NON_CACHED = ["default", "qd+dq per-direction scale 50", "all directions", "in-batch hardness",
              "all-negative hardness, all directions"]  # fmt: skip


@pytest.mark.parametrize("options", [OPTIONS[k] for k in NON_CACHED], ids=NON_CACHED)
@pytest.mark.parametrize("mini_batch_size", [3, 50])
def test_same_as_non_cached_mnrl(model, options: dict, mini_batch_size: int) -> None:
    """Gradient caching changes nothing: the non-cached MultipleNegativesRankingLoss's loss and gradients, whether the
    mini-batch size divides the batch or exceeds it."""
    cols = (ANCHORS, POSITIVES)
    ref = loss_and_grads(model, MultipleNegativesRankingLoss(model, **options), cols)
    ours = CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size, **options)
    assert_same(loss_and_grads(model, ours, cols), ref)


def test_joint_queries_and_documents_go_through_the_fused_op(model, monkeypatch: pytest.MonkeyPatch) -> None:
    """query_to_doc and doc_to_query (either partition) are f2llm.kernels.infonce calls; the directions with row
    masks and hardness are not (see _masked_loss)."""
    calls: list[tuple[int, ...]] = []
    real = integration.infonce

    def recording(q, c, targets, **kwargs):
        calls.append((*q.shape, c.shape[0]))
        return real(q, c, targets, **kwargs)

    monkeypatch.setattr(integration, "infonce", recording)
    cols = (ANCHORS, POSITIVES, NEGATIVES)
    for options, expected in [
        ({}, [(7, 32, 14)]),
        (OPTIONS["qd+dq joint"], [(7, 64, 21)]),  # rows [q_i, d_i], candidates [d_j, 0] and [0, q_j]
        (OPTIONS["qd+dq per-direction scale 50"], [(7, 32, 14), (7, 32, 7)]),
        (OPTIONS["all directions"], []),
    ]:
        calls.clear()
        with torch.no_grad():
            CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, **options)(features(model, *cols), None)
        assert calls == expected


# ------------------------------------------------------------------------------------------------ similarity
@pytest.mark.parametrize(
    ("fct", "normalizes"),
    [
        (cos_sim, True),
        (dot_score, False),
        (functools.partial(cos_sim), True),
        (functools.partial(functools.partial(dot_score)), False),
        (lambda a, b: cos_sim(a, b), True),
        (lambda a, b: a @ b.T, False),
        (euclidean_sim, None),
        (lambda a, b: cos_sim(a, b) * 2, None),
        (torch.nn.CosineSimilarity(dim=-1), None),  # pairwise, not a similarity matrix
    ],
    ids=["cos", "dot", "partial-cos", "nested-partial-dot", "lambda-cos", "matmul", "euclidean", "2cos", "pairwise"],
)
def test_similarity_recognised_by_value(fct, normalizes: bool | None) -> None:
    assert integration._similarity_kind(fct) is normalizes


def test_other_similarity_is_refused_naming_it(model) -> None:
    with pytest.raises(ValueError, match="similarity_fct=euclidean_sim"):
        CachedMultipleNegativesRankingLoss(model, similarity_fct=euclidean_sim)


def test_hyperparameters_stay_assignable(model) -> None:
    """Reassigned hyperparameters reach the loss (sentence-transformers delegates them to its inner loss); an
    unsupported similarity assigned later is refused at the next forward."""
    cols = (ANCHORS, POSITIVES)
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=4)
    loss.scale, loss.directions = 5.0, ALL_DIRECTIONS
    loss.hardness_mode, loss.hardness_strength = "in_batch_negatives", 2.0
    assert loss.temperature == pytest.approx(0.2) and loss.loss.scale == 5.0
    ref = STLoss(model, mini_batch_size=4, scale=5.0, directions=ALL_DIRECTIONS, hardness_mode="in_batch_negatives",
                 hardness_strength=2.0)  # fmt: skip
    assert_same(loss_and_grads(model, loss, cols), loss_and_grads(model, ref, cols))
    similarity = torch.nn.CosineSimilarity(dim=-1)
    loss.similarity_fct = similarity
    assert loss.similarity_fct is similarity and "similarity_fct" not in loss._modules
    loss.get_config_dict()
    with pytest.raises(ValueError, match="similarity_fct"):
        loss(features(model, *cols), None)


def test_attributes_and_config_are_sentence_transformers(model) -> None:
    kwargs = dict(scale=42.0, mini_batch_size=4, directions=("query_to_doc", "doc_to_query"))
    kwargs |= dict(partition_mode="per_direction", hardness_mode="in_batch_negatives", hardness_strength=9.0)
    loss = CachedMultipleNegativesRankingLoss(model, **kwargs)
    assert loss.get_config_dict() == STLoss(model, **kwargs).get_config_dict()
    assert loss.temperature == pytest.approx(1 / 42.0) and loss.gather_across_devices is False
    no_name = CachedMultipleNegativesRankingLoss(model, similarity_fct=functools.partial(cos_sim))
    assert "cos_sim" in no_name.get_config_dict()["similarity_fct"]
    with pytest.raises(ValueError, match="Scale must be a positive value"):
        CachedMultipleNegativesRankingLoss(model, scale=-1.0)
    with pytest.raises(ValueError, match="per_direction"):  # sentence-transformers' own validation, kept
        CachedMultipleNegativesRankingLoss(model, directions=ALL_DIRECTIONS, partition_mode="per_direction")


# ------------------------------------------------------------------------------------------------ gradient cache
def test_same_gradients_as_mnrl_and_different_data_differs(model) -> None:
    """The cached loss is MNRL's on the same triplets (also with the loss scaled by 1000, fp16-scaler style), and
    not on other triplets."""
    cols = (ANCHORS[:5], POSITIVES[:5], NEGATIVES[:5])
    ref = loss_and_grads(model, MultipleNegativesRankingLoss(model), cols)
    ours = CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)
    assert_same(loss_and_grads(model, ours, cols), ref)
    scaled = loss_and_grads(model, ours, cols, scale=1000.0)
    assert_same(scaled, (ref[0] * 1000, {k: v * 1000 for k, v in ref[1].items()}))
    other = loss_and_grads(model, ours, (ANCHORS[4:], POSITIVES[4:], NEGATIVES[4:]))
    assert rel(other[0], ref[0]) > 1e-3


def test_token_budget_matches_mnrl(model) -> None:
    cols = (VARIED_A, VARIED_B)
    ref = loss_and_grads(model, MultipleNegativesRankingLoss(model), cols)
    assert_same(loss_and_grads(model, CachedMultipleNegativesRankingLoss(model, mini_batch_num_tokens=16), cols), ref)


def _spy(loss: CachedMultipleNegativesRankingLoss) -> dict[str, list[Tensor]]:
    """Record every embedding an instance-level embed_minibatch override returns, per pass."""
    record: dict[str, list[Tensor]] = {"forward": [], "backward": []}
    inner = loss.embed_minibatch

    def spy(**kwargs):
        reps, state = inner(**kwargs)
        record["backward" if torch.is_grad_enabled() else "forward"].append(reps.detach().clone())
        return reps, state

    loss.embed_minibatch = spy
    return record


@pytest.mark.parametrize("minibatching", [dict(mini_batch_size=3), dict(mini_batch_num_tokens=16)])
def test_overridden_embed_minibatch_is_called_and_dropout_replayed(train_model, minibatching: dict) -> None:
    """An embed_minibatch assigned on the instance embeds every mini-batch in both passes, and pass 2 re-embeds
    bit-for-bit what pass 1 did, dropout included (uneven token-budget mini-batches too)."""
    assert any(m.p > 0 for m in train_model.modules() if isinstance(m, torch.nn.Dropout))
    loss = CachedMultipleNegativesRankingLoss(train_model, **minibatching)
    record = _spy(loss)
    cols = (VARIED_A, VARIED_B) if "mini_batch_num_tokens" in minibatching else (ANCHORS, POSITIVES)
    value = loss(features(train_model, *cols), None)
    value.backward()
    forward, backward = record["forward"], record["backward"]
    assert len(forward) == len(backward) >= 4
    for f, b in zip(forward, backward, strict=True):
        assert f.shape == b.shape and torch.equal(f, b)
    assert gradients(train_model)


def test_subclass_embed_minibatch_is_honoured(model) -> None:
    """A subclass's embed_minibatch (here: embeddings doubled) is what the loss sees, with sentence-transformers'
    class subclassed the same way as the reference."""
    cols = (ANCHORS, POSITIVES)

    def doubled(self, **kwargs):
        reps, state = STLoss.embed_minibatch(self, **kwargs)
        return reps * 2, state

    ours_cls = type("Doubled", (CachedMultipleNegativesRankingLoss,), {"embed_minibatch": doubled})
    ref_cls = type("Doubled", (STLoss,), {"embed_minibatch": doubled})
    options = dict(mini_batch_size=3, similarity_fct=dot_score, scale=5.0)
    ref = loss_and_grads(model, ref_cls(model, **options), cols)
    assert_same(loss_and_grads(model, ours_cls(model, **options), cols), ref)
    plain = loss_and_grads(model, CachedMultipleNegativesRankingLoss(model, **options), cols)
    assert rel(plain[0], ref[0]) > 1e-3  # the override really changed the loss


def test_two_forwards_before_one_backward(model) -> None:
    """Each forward's backward hook holds its own cache: one loss object used twice equals two objects."""
    first = features(model, ANCHORS[:4], POSITIVES[:4])
    second = features(model, ANCHORS[3:], POSITIVES[3:])
    model.zero_grad(set_to_none=True)
    shared = CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)
    (shared(first, None) + shared(second, None)).backward()
    shared_grads = gradients(model)
    model.zero_grad(set_to_none=True)
    a = CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)(first, None)
    b = CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)(second, None)
    (a + b).backward()
    assert grads_rel(shared_grads, gradients(model)) < 1e-6


@pytest.mark.parametrize("accumulation", [2, 4])
def test_gradient_scales_with_the_outer_backward(model, accumulation: int) -> None:
    cols = (ANCHORS[:6], POSITIVES[:6])
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)
    _, unscaled = loss_and_grads(model, loss, cols)
    _, scaled = loss_and_grads(model, loss, cols, scale=1 / accumulation)
    assert grads_rel(scaled, {k: v / accumulation for k, v in unscaled.items()}) < 1e-6


@pytest.mark.parametrize("training", [True, False])
def test_loss_under_no_grad(model, training: bool) -> None:
    """The evaluation loss (no_grad), in train mode (dropout off here) and eval mode: MNRL's."""
    cols = features(model, ANCHORS[:6], POSITIVES[:6])
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0 if training else module.p
    model.train(training)
    try:
        with torch.no_grad():
            ours = CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)(cols, None)
            ref = MultipleNegativesRankingLoss(model)(features(model, ANCHORS[:6], POSITIVES[:6]), None)
    finally:
        model.eval()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.1
    assert rel(ours, ref) < 1e-5


def test_bf16_autocast_loss_dtype_and_finite_gradients(train_model) -> None:
    """Under bf16 autocast the loss comes back bf16, as sentence-transformers' does (with a Dense module the
    embeddings themselves are bf16); backward outside autocast gives finite gradients everywhere."""
    train_model.append(Dense(32, 16, activation_function=torch.nn.Tanh()))
    for module in train_model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    cols = features(train_model, ANCHORS[:6], POSITIVES[:6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = STLoss(train_model, mini_batch_size=2)(cols, None)
        loss = CachedMultipleNegativesRankingLoss(train_model, mini_batch_size=2)(cols, None)
    assert ref.dtype == loss.dtype == torch.bfloat16
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 0.05 * abs(ref.item()) + 1e-2
    train_model.zero_grad(set_to_none=True)
    loss.backward()
    grads = gradients(train_model)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())


def test_unused_column_is_named(model) -> None:
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)
    real = loss.calculate_loss  # a loss that reads only the first two columns
    loss.calculate_loss = lambda reps, labels=None, *, with_backward=False: real(reps[:2], with_backward=with_backward)
    with pytest.raises(ValueError, match=r"column\(s\) 2"):
        loss(features(model, ANCHORS[:4], POSITIVES[:4], NEGATIVES[:4]), None)


def test_backward_releases_the_hook_state(model, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook holds its step's mini-batches and cached gradients until the loss is dropped, not after."""
    steps: list[weakref.ref] = []
    real = integration._Step

    def recording(**kwargs):
        step = real(**kwargs)
        steps.append(weakref.ref(step))
        return step

    monkeypatch.setattr(integration, "_Step", recording)
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=3)(
        features(model, ANCHORS[:4], POSITIVES[:4]), None
    )
    loss.backward()
    gc.collect()
    assert len(steps) == 1 and steps[0]() is not None
    del loss
    gc.collect()
    assert steps[0]() is None


def test_prompt_exclusion_matches_mnrl(model) -> None:
    """Pooling without the prompt cannot be packed: the padded forward embeds, the features' masks are left as
    they were, and the loss is MNRL's."""
    model = SentenceTransformer(modules=[model[0], Pooling(32, "mean", include_prompt=False), Normalize()])
    model.eval()

    def prompted() -> list[dict[str, Tensor]]:
        cols = features(model, VARIED_A, VARIED_B)
        for c in cols:
            c["prompt_length"] = 2
        return cols

    batch = prompted()
    mask = batch[0]["attention_mask"].clone()
    model.zero_grad(set_to_none=True)
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_num_tokens=16)(batch, None)
    assert torch.equal(mask, batch[0]["attention_mask"])
    loss.backward()
    ours = (loss.detach(), gradients(model))
    model.zero_grad(set_to_none=True)
    ref = MultipleNegativesRankingLoss(model)(prompted(), None)
    ref.backward()
    assert_same(ours, (ref.detach(), gradients(model)))


@pytest.mark.parametrize("mini_batch_size", [2, 3])
def test_matryoshka(model, mini_batch_size: int) -> None:
    cols = (ANCHORS[:6], POSITIVES[:6])
    ref = loss_and_grads(model, MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), [32, 16, 8]), cols)
    ours = MatryoshkaLoss(
        model, CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size), [32, 16, 8]
    )
    assert_same(loss_and_grads(model, ours, cols), ref)


GATHERED = ["all-negative hardness, all directions", "qd+dq joint", "qd+dq per-direction scale 50"]


@pytest.mark.parametrize("options", [OPTIONS[k] for k in GATHERED], ids=GATHERED)
def test_gather_across_devices_offset(model, options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of a simulated world of 2 whose gather returns [local; local]: the gathered batch is the local one
    twice and this rank's rows start at 4, so by symmetry its loss is the ungathered loss of the doubled batch."""
    generator = torch.Generator().manual_seed(0)
    anchors, positives = torch.randn(4, 16, generator=generator), torch.randn(4, 16, generator=generator)
    options = {**options, "mini_batch_size": 2}
    reference = CachedMultipleNegativesRankingLoss(model, **options).calculate_loss(
        [[torch.cat([anchors, anchors])], [torch.cat([positives, positives])]]
    )
    monkeypatch.setattr(integration.distributed, "world_size", lambda group=None: 2)
    monkeypatch.setattr(integration.distributed, "rank", lambda group=None: 1)
    monkeypatch.setattr(integration.distributed, "all_gather_sizes", lambda n, device, group=None: [n, n])
    monkeypatch.setattr(
        integration.distributed, "all_gather_with_grad", lambda x, group=None, sizes=None: torch.cat([x, x])
    )
    rank1 = CachedMultipleNegativesRankingLoss(model, gather_across_devices=True, **options).calculate_loss(
        [[anchors], [positives]]
    )
    assert torch.isfinite(rank1) and rel(rank1, reference) < 1e-6
