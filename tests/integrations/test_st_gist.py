"""f2llm's CachedGISTEmbedLoss against sentence-transformers' CachedGISTEmbedLoss, the independent reference: the
same loss and every parameter gradient to 1e-5, for pairs and triplets, both margin strategies, contrast_anchors /
contrast_positives on and off, and guides that differ from the model (other weights; re-tokenized; unpackable).

Also bf16 autocast, dropout replayed in pass 2 (train mode), and ``gather_across_devices`` on 2 gloo ranks (this file
is also the torchrun worker: ``python tests/integrations/test_st_gist.py OUT_DIR``).

Models are random tiny BERTs (2 layers, width 32) in the packaged MiniLM's Transformer module (its tokenizer), as in
test_st_cmnrl_options.py: no hub access, a loss with its gradients in well under a second on one core.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss as STLoss
from sentence_transformers.sentence_transformer.modules import Dense
from torch import Tensor

from f2llm.distributed import free_port
from f2llm.integrations import sentence_transformers as integration
from f2llm.integrations.sentence_transformers import CachedGISTEmbedLoss
from tests.integrations.st_helpers import (
    ANCHORS,
    NEGATIVES,
    POSITIVES,
    features,
    gradients,
    grads_rel,
    loss_and_grads,
    rel,
    tiny_model,
)
from tests.integrations.st_helpers import assert_same as assert_equal_to_reference

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
RANK_ROWS = 3  # rows per rank in the 2-rank test: mini-batches of 2 give uneven blocks

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


# ------------------------------------------------------------------------------------------------ bf16 autocast
def _autocast_model(kind: str) -> SentenceTransformer:
    if kind == "packed":
        return tiny_model()
    if kind == "padded":
        return tiny_model(pooling="max")  # unpackable: sentence-transformers' padded forward embeds it
    model = tiny_model()
    # A Dense module after Normalize: under autocast the embeddings themselves are bf16 (a BERT's LayerNorm output,
    # hence its pooled embedding, stays float32 under CPU autocast).
    model.append(Dense(32, 16, activation_function=torch.nn.Tanh()))
    return model


def _bf16_loss_and_grads(
    model: SentenceTransformer, loss_fn: torch.nn.Module, cols: Sequence[list[str]], backward_inside: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(features(model, *cols), None)
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    return loss.detach(), gradients(model)


# How much closer f2llm's bf16 gradients must be to sentence-transformers' bf16 ones than those are to the fp32 run.
# Measured over every OPTIONS entry, pairs and triplets: packed 0.16-0.37 (bf16 rounds the packed forward's sums
# differently from the padded one's), padded 0.01-0.05 (the very same forward); a pass 2 run without autocast lands
# 0.85-0.95 (packed) and 0.58-0.82 (padded) away.
BF16_GRAD_RATIO = {"packed": 0.5, "padded": 0.2}


@pytest.mark.parametrize("kind", ["packed", "padded", "bf16 embeddings"])
def test_bf16_autocast(guide, kind: str) -> None:
    """Forward under bf16 autocast, backward outside it (as a trainer does): the loss has sentence-transformers'
    dtype, every forward of the model (both passes) and of the guide runs under autocast, and the loss and gradients
    are sentence-transformers' to bf16's precision.

    The reference runs its backward inside the autocast: sentence-transformers' backward hook re-embeds under
    whatever autocast is on at backward time (in its trainer, accelerate's autocast around the model's forward),
    whereas f2llm's replays pass 1's. With bf16 embeddings (Dense) sentence-transformers scores them in bf16, which
    moves its loss by up to 5 % and its gradients by about 8 %; f2llm scores them in float32: nearer the fp32 run.
    """
    model = _autocast_model(kind)
    kwargs = dict(mini_batch_size=3, margin=0.02)
    fp32 = loss_and_grads(model, STLoss(model, guide, **kwargs), TRIPLETS)
    ref = _bf16_loss_and_grads(model, STLoss(model, guide, **kwargs), TRIPLETS, backward_inside=True)
    seen: dict[str, list[tuple[bool, bool]]] = {"model": [], "guide": []}  # (grad enabled, autocast on) per forward
    # The packed forward calls the Hugging Face model, sentence-transformers' padded one its Transformer module (which
    # calls the Hugging Face model's forward method, no hook): one of the two runs per forward.
    hooks = [
        module.register_forward_pre_hook(
            lambda *_, key=key: seen[key].append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        )
        for key, m in (("model", model), ("guide", guide))
        for module in (m[0], m[0].model)
    ]
    try:
        ours = _bf16_loss_and_grads(model, CachedGISTEmbedLoss(model, guide, **kwargs), TRIPLETS, backward_inside=False)
    finally:
        for hook in hooks:
            hook.remove()
    # float32 on CPU, even from bf16 scores: sentence-transformers' cross-entropy runs in float32 under CPU autocast.
    assert ours[0].dtype == ref[0].dtype
    assert {grad for grad, _ in seen["model"]} == {False, True}  # pass 1 and pass 2 both embedded the model
    assert seen["guide"] and all(autocast for key in seen for _, autocast in seen[key])
    bf16_grad_error = grads_rel(ref[1], fp32[1])
    assert bf16_grad_error > 5e-5  # bf16 really moves the gradients: the ratios below are measurable
    loss_error, grad_error = rel(ours[0], ref[0]), grads_rel(ours[1], ref[1])
    if kind == "bf16 embeddings":
        assert rel(ours[0], fp32[0]) < rel(ref[0], fp32[0])
        assert grads_rel(ours[1], fp32[1]) < 0.5 * bf16_grad_error  # measured 0.18
        assert loss_error < 0.1  # measured 0.02
    else:
        # bf16 moves the loss itself by 2e-5 to 6e-5 here, the packed embeddings from the padded ones by 7e-6.
        assert loss_error < 2e-5
        assert grad_error < BF16_GRAD_RATIO[kind] * bf16_grad_error, (grad_error, bf16_grad_error)


# ------------------------------------------------------------------------------------------------ dropout replay
@pytest.fixture
def train_model(model: SentenceTransformer) -> Iterator[SentenceTransformer]:
    """The module's model in train mode (dropout 0.1 on), put back in eval mode afterwards."""
    model.train()
    yield model
    model.eval()
    model.zero_grad(set_to_none=True)


def test_unpacked_model_dropout_matches_sentence_transformers(guide) -> None:
    """Train mode (dropout on), a model f2llm cannot pack (max pooling): sentence-transformers' padded forward embeds
    it, mini-batch by mini-batch in sentence-transformers' order, and the guide (eval mode) draws no random numbers,
    so from the same seed both classes draw the same dropout masks: pass 2's replay must give sentence-transformers'
    loss and gradients. Another seed gives other gradients (dropout matters here)."""
    model = tiny_model(pooling="max").train()
    kwargs = dict(mini_batch_size=3, margin=0.02)
    results: list[tuple[Tensor, dict[str, Tensor]]] = []
    for cls, seed in ((STLoss, 7), (CachedGISTEmbedLoss, 7), (CachedGISTEmbedLoss, 8)):
        torch.manual_seed(seed)
        results.append(loss_and_grads(model, cls(model, guide, **kwargs), TRIPLETS))
    ref, ours, other = results
    assert_same(ours, ref)
    assert grads_rel(other[1], ref[1]) > 0.1


def test_dropout_replayed_in_pass_two(train_model, guide) -> None:
    """Train mode, packed forward (whose dropout masks have the packed rows' shapes, not sentence-transformers'):
    pass 2 replays each mini-batch's RNG state, so the transformer's outputs in pass 2 are pass 1's bit for bit, and
    the loss and gradients are those of one graph through pass 1's forwards from the same seed, scored by
    sentence-transformers' calculate_loss (1e-5). The same seed gives the same gradients, another seed others."""
    model = train_model
    kwargs = dict(mini_batch_size=3, margin=0.02)
    loss_fn = CachedGISTEmbedLoss(model, guide, **kwargs)
    outputs: dict[bool, list[Tensor]] = {False: [], True: []}  # by grad mode: pass 1 (off), pass 2 (on)

    def record(module, args, output) -> None:
        outputs[torch.is_grad_enabled()].append(output.last_hidden_state.detach().clone())

    hook = model[0].model.register_forward_hook(record)
    try:
        torch.manual_seed(7)
        loss, grads = loss_and_grads(model, loss_fn, TRIPLETS)
    finally:
        hook.remove()
    assert len(outputs[True]) == len(outputs[False]) >= 2 * len(TRIPLETS)  # several mini-batches per column
    assert all(torch.equal(a, b) for a, b in zip(outputs[False], outputs[True], strict=True))

    torch.manual_seed(7)
    again = loss_and_grads(model, loss_fn, TRIPLETS)
    torch.manual_seed(8)
    other = loss_and_grads(model, loss_fn, TRIPLETS)
    assert torch.equal(again[0], loss) and grads_rel(again[1], grads) == 0.0
    assert grads_rel(other[1], grads) > 0.1

    # The reference: pass 1's packed forwards, in pass 1's order from the same seed, in one graph.
    torch.manual_seed(7)
    model.zero_grad(set_to_none=True)
    plan, _ = integration._packed_model(model)
    cols = features(model, *TRIPLETS)
    reps = [[torch.cat([integration._embed_packed(plan, c) for c in loss_fn._mini_batches(f, plan)])] for f in cols]
    with torch.no_grad():
        guided = [[guide(dict(f))["sentence_embedding"]] for f in cols]
    reference = STLoss(model, guide, **kwargs).calculate_loss(reps, guided)
    reference.backward()
    assert rel(loss, reference.detach()) < 1e-5
    assert grads_rel(grads, gradients(model)) < 1e-5


def test_dropout_gradient_is_the_derivative_of_the_returned_loss(train_model, guide) -> None:
    """Independent of how the passes are built: reseeded, the evaluation (no_grad) loss is the one the training call
    returned (the same dropout masks), and its central difference at theta +- eps * g / |g| is |g|, g the returned
    gradient (float32 loss, eps = 1e-3: measured 1.5e-5 of |g|). Gradients through other dropout masks than the
    loss's (pass 2 drawing fresh ones) miss it by about 30 % here."""
    model = train_model
    loss_fn = CachedGISTEmbedLoss(model, guide, mini_batch_size=3, margin=0.02)
    torch.manual_seed(7)
    loss, grads = loss_and_grads(model, loss_fn, TRIPLETS)
    params = {n: p for n, p in model.named_parameters() if n in grads}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    saved = {n: p.detach().clone() for n, p in params.items()}

    def seeded_loss(eps: float) -> float:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n] + eps * grads[n] / norm)
            torch.manual_seed(7)
            value = loss_fn(features(model, *TRIPLETS), None).double().item()
            for n, p in params.items():  # restored exactly, not by subtracting: the model is the module's
                p.copy_(saved[n])
        return value

    assert abs(seeded_loss(0.0) - loss.item()) <= 1e-6 * abs(loss.item())
    eps = 1e-3
    slope = (seeded_loss(eps) - seeded_loss(-eps)) / (2 * eps)
    assert abs(slope - norm) < 1e-3 * norm, (slope, norm)


# ------------------------------------------------------------------------------------------------ 2 ranks
def _worker(out: Path) -> None:
    """torchrun rank: sentence-transformers' loss and f2llm's with gather_across_devices=True on this rank's rows, on
    the plain model (per-rank gradients), f2llm's under DDP (averaged over the ranks), and f2llm's loss without
    gathering."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, guide = tiny_model(), tiny_model(seed=1)  # the same weights on every rank
    cols = [c[RANK_ROWS * rank : RANK_ROWS * (rank + 1)] for c in TRIPLETS]
    kwargs = dict(mini_batch_size=2, margin=0.02)
    result: dict[str, object] = {}
    for name, cls in (("st", STLoss), ("ours", CachedGISTEmbedLoss)):
        result[name] = loss_and_grads(model, cls(model, guide, gather_across_devices=True, **kwargs), cols)
    with torch.no_grad():
        result["local"] = CachedGISTEmbedLoss(model, guide, **kwargs)(features(model, *cols), None)
    loss_fn = CachedGISTEmbedLoss(model, guide, gather_across_devices=True, **kwargs)
    loss_fn.model = DistributedDataParallel(model, find_unused_parameters=True)  # as SentenceTransformerTrainer does
    result["ddp"] = loss_and_grads(model, loss_fn, cols)
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_gather_across_devices_two_ranks(tmp_path: Path) -> None:
    """Each rank's loss and gradients are sentence-transformers': both gather every rank's positives and negatives
    (model and guide) with a gradient summed over the ranks, and score this rank's anchors against them, so the
    per-rank gradients are defined alike. Under DDP f2llm's are their average over the ranks."""
    from tests.helpers import HANG_BOUND, training_env  # here: this file is also the torchrun worker

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(WORLD),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), __file__, str(tmp_path)]  # fmt: skip
    # The worker imports tests.integrations: the repository root first on its path (a script gets its own folder).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = training_env(PYTHONPATH=path)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_BOUND, env=env, check=False)
    assert proc.returncode == 0, f"torchrun failed:\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r in ranks:
        assert_same(r["ours"], r["st"])
        assert rel(r["local"], r["st"][0]) > 1e-2  # the other rank's candidates change the loss
    assert grads_rel(ranks[0]["st"][1], ranks[1]["st"][1]) > 1e-2  # so that averaging is a real check
    mean = {k: (ranks[0]["st"][1][k] + ranks[1]["st"][1][k]) / 2 for k in ranks[0]["st"][1]}
    for r in ranks:
        assert rel(r["ddp"][0], r["st"][0]) < 1e-5 and grads_rel(r["ddp"][1], mean) < 1e-5


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
