"""f2llm.integrations.sentence_transformers.MultipleNegativesRankingLoss against sentence-transformers' own.

The independent reference is sentence-transformers' MultipleNegativesRankingLoss: the same loss and every parameter
gradient to 1e-5 for pairs and triplets and a few option combinations, on the random tiny BERT of
test_st_cmnrl_options.py (the packaged MiniLM's Transformer module). The packed forward and the fused op really run.
"""

from __future__ import annotations

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.normalize import Normalize
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as STLoss
from sentence_transformers.sentence_transformer.modules import Dense, Pooling
from sentence_transformers.util import dot_score, euclidean_sim

from f2llm.integrations import sentence_transformers as integration
from f2llm.integrations.sentence_transformers import MultipleNegativesRankingLoss
from tests.integrations.st_helpers import assert_same, features, gradients, loss_and_grads, rel, tiny_model
from tests.integrations.test_st_cmnrl_options import ALL_DIRECTIONS, ANCHORS, NEGATIVES, POSITIVES, VARIED_A, VARIED_B

OPTIONS = {
    "default": {},
    "qd+dq joint": dict(directions=("query_to_doc", "doc_to_query")),
    "qd+dq per-direction scale 50": dict(
        directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction", scale=50.0
    ),
    "dot scale 1": dict(similarity_fct=dot_score, scale=1.0),
    "all directions": dict(directions=ALL_DIRECTIONS),
    "all-negative hardness": dict(hardness_mode="all_negatives", hardness_strength=5.0),
}


@pytest.mark.parametrize("n_negatives", [0, 1])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_same_loss_and_gradients_as_sentence_transformers(model, options: dict, n_negatives: int) -> None:
    cols = (ANCHORS, POSITIVES, NEGATIVES)[: 2 + n_negatives]
    ref = loss_and_grads(model, STLoss(model, **options), cols)
    assert_same(loss_and_grads(model, MultipleNegativesRankingLoss(model, **options), cols), ref)


def test_texts_of_very_different_lengths(model) -> None:
    """Texts shorter and longer than a packed row, several per row."""
    cols = (VARIED_A, VARIED_B, list(reversed(VARIED_A)))
    ref = loss_and_grads(model, STLoss(model), cols)
    ours = MultipleNegativesRankingLoss(model)
    ours.pack_row_tokens = 8
    assert_same(loss_and_grads(model, ours, cols), ref)


def test_packed_forward_and_fused_op_run(model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every column's texts go through one packed forward, the loss through f2llm.kernels.infonce; the model's own
    (padded) forward never runs."""
    packed: list[int] = []
    fused: list[tuple[int, ...]] = []
    real_embed, real_infonce = integration._embed_packed, integration.infonce

    def embed(plan, chunk):
        out = real_embed(plan, chunk)
        packed.append(out.shape[0])
        return out

    def infonce(q, c, targets, **kwargs):
        fused.append((*q.shape, c.shape[0]))
        return real_infonce(q, c, targets, **kwargs)

    monkeypatch.setattr(integration, "_embed_packed", embed)
    monkeypatch.setattr(integration, "infonce", infonce)
    padded = model.register_forward_pre_hook(lambda *_: pytest.fail("the padded forward ran"))
    try:
        loss = MultipleNegativesRankingLoss(model)(features(model, ANCHORS, POSITIVES, NEGATIVES), None)
        loss.backward()
    finally:
        padded.remove()
    assert packed == [21] and fused == [(7, 32, 14)]


def test_bf16_autocast_loss_dtype(model) -> None:
    """Under bf16 autocast the loss comes back bf16, as sentence-transformers' does (with a Dense module, so the
    padded fallback's embeddings are bf16 too; and packed, on the plain model), close to theirs, with finite
    gradients."""
    dense = SentenceTransformer(modules=[*model, Dense(32, 16, activation_function=torch.nn.Tanh())], device="cpu")
    for m in (model, dense.eval()):
        cols = features(m, ANCHORS, POSITIVES)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = STLoss(m)(cols, None)
            loss = MultipleNegativesRankingLoss(m)(cols, None)
        assert ref.dtype == loss.dtype == torch.bfloat16
        assert abs(loss.item() - ref.item()) < 0.05 * abs(ref.item()) + 1e-2
        m.zero_grad(set_to_none=True)
        loss.backward()
        grads = gradients(m)
        assert grads and all(torch.isfinite(g).all() for g in grads.values())
    model.zero_grad(set_to_none=True)


def test_unpackable_model_falls_back(model, caplog) -> None:
    """Max pooling cannot be packed: sentence-transformers' padded forward embeds (a warning says why), the loss is
    the same."""
    unpackable = SentenceTransformer(modules=[model[0], Pooling(32, "max"), Normalize()], device="cpu").eval()
    cols = (ANCHORS, POSITIVES, NEGATIVES)
    ref = loss_and_grads(unpackable, STLoss(unpackable), cols)
    with caplog.at_level("WARNING", logger=integration.__name__):
        ours = loss_and_grads(unpackable, MultipleNegativesRankingLoss(unpackable), cols)
    assert any("pooling mode 'max'" in r.getMessage() for r in caplog.records)
    assert_same(ours, ref)


def test_matryoshka(model) -> None:
    """MatryoshkaLoss replaces the model's forward to truncate the embeddings: that forward is used, not packing."""
    cols = (ANCHORS, POSITIVES)
    ref = loss_and_grads(model, MatryoshkaLoss(model, STLoss(model), [32, 16, 8]), cols)
    ours = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), [32, 16, 8])
    assert_same(loss_and_grads(model, ours, cols), ref)


def test_config_and_validation_are_sentence_transformers(model) -> None:
    kwargs = dict(scale=42.0, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
    kwargs |= dict(hardness_mode="in_batch_negatives", hardness_strength=9.0)
    assert MultipleNegativesRankingLoss(model, **kwargs).get_config_dict() == STLoss(model, **kwargs).get_config_dict()
    with pytest.raises(ValueError, match="Scale must be a positive value"):
        MultipleNegativesRankingLoss(model, scale=-1.0)
    with pytest.raises(ValueError, match="similarity_fct=euclidean_sim"):
        MultipleNegativesRankingLoss(model, similarity_fct=euclidean_sim)


def test_under_no_grad(model) -> None:
    with torch.no_grad():
        ours = MultipleNegativesRankingLoss(model)(features(model, ANCHORS, POSITIVES), None)
        ref = STLoss(model)(features(model, ANCHORS, POSITIVES), None)
    assert not ours.requires_grad and rel(ours, ref) < 1e-5


@pytest.mark.parametrize("options", [OPTIONS["qd+dq joint"], OPTIONS["all directions"]], ids=["qd+dq", "all"])
def test_gather_across_devices_offset(model, options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of a simulated world of 2 whose gather returns [local; local]: this rank's rows start at 4, so by
    symmetry its loss is the ungathered loss of the doubled batch, and so is sentence-transformers'."""
    generator = torch.Generator().manual_seed(0)
    anchors, positives = torch.randn(4, 16, generator=generator), torch.randn(4, 16, generator=generator)
    reference = MultipleNegativesRankingLoss(model, **options).compute_loss_from_embeddings(
        [torch.cat([anchors, anchors]), torch.cat([positives, positives])]
    )
    monkeypatch.setattr(integration.distributed, "world_size", lambda group=None: 2)
    monkeypatch.setattr(integration.distributed, "rank", lambda group=None: 1)
    monkeypatch.setattr(integration.distributed, "all_gather_sizes", lambda n, device, group=None: [n, n])
    monkeypatch.setattr(
        integration.distributed, "all_gather_with_grad", lambda x, group=None, sizes=None: torch.cat([x, x])
    )
    rank1 = MultipleNegativesRankingLoss(model, gather_across_devices=True, **options)
    assert rel(rank1.compute_loss_from_embeddings([anchors, positives]), reference) < 1e-6


def test_gather_offset_is_sentence_transformers(model, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same simulated rank 1 of 2, on both classes: the same loss and embedding gradients."""
    from sentence_transformers.sentence_transformer.losses import multiple_negatives_ranking as st_module

    generator = torch.Generator().manual_seed(1)
    anchors, positives = torch.randn(4, 16, generator=generator), torch.randn(4, 16, generator=generator)
    monkeypatch.setattr(integration.distributed, "world_size", lambda group=None: 2)
    monkeypatch.setattr(integration.distributed, "rank", lambda group=None: 1)
    monkeypatch.setattr(integration.distributed, "all_gather_sizes", lambda n, device, group=None: [n, n])
    monkeypatch.setattr(
        integration.distributed, "all_gather_with_grad", lambda x, group=None, sizes=None: x.repeat(2, 1)
    )
    monkeypatch.setattr(st_module, "get_rank", lambda: 1)
    monkeypatch.setattr(st_module, "all_gather_with_grad", lambda x: x.repeat(2, 1))
    results = []
    for cls in (STLoss, MultipleNegativesRankingLoss):
        a, p = anchors.clone().requires_grad_(), positives.clone().requires_grad_()
        loss = cls(model, gather_across_devices=True, **OPTIONS["qd+dq joint"]).compute_loss_from_embeddings(
            [a, p], None
        )
        loss.backward()
        results.append((loss.detach(), a.grad, p.grad))
    (ref, *ref_grads), (ours, *our_grads) = results
    assert rel(ours, ref) < 1e-5 and all(rel(g, r) < 1e-5 for g, r in zip(our_grads, ref_grads, strict=True))


def test_ddp_gradients_all_reduced_once_after_backward(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DistributedDataParallel (a world of 1 here) the packed forward bypasses DDP's reducer: the loss
    all-reduces the gradients itself once the backward has finished (they are then sentence-transformers'), and not
    inside no_sync."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    calls: list[bool] = []
    real = integration._all_reduce_gradients

    def recording(ddp):
        calls.append(all(p.grad is not None for p in ddp.module.parameters() if p.requires_grad))
        real(ddp)

    monkeypatch.setattr(integration, "_all_reduce_gradients", recording)
    model = tiny_model()  # its own: DDP registers hooks on the parameters
    cols = (ANCHORS, POSITIVES)
    ref = loss_and_grads(model, STLoss(model), cols)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        loss = MultipleNegativesRankingLoss(model)
        loss.model = DistributedDataParallel(model)
        assert_same(loss_and_grads(model, loss, cols), ref)
        assert calls == [True]
        with loss.model.no_sync():
            assert_same(loss_and_grads(model, loss, cols), ref)
        assert calls == [True]
    finally:
        dist.destroy_process_group()
