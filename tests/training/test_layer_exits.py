"""Layer exits (ML-Embed's depth Matryoshka, ``model.layer_exits``) against ML-Embed's formulas in float64.

The reference below is written from ML-Embed's code (its model.py / utils.py), as a loop, independently of f2llm's
encoder, pooling and kernels:

* exit k's embedding of a text is the hidden state after k layers (``hidden_states[k]``) at the text's last token,
  through the model's final norm unless k is the last layer (whose output already went through it);
* every exit gets the full loss: the hard term (query against [positive, hard negatives]) plus, for retrieval, the
  in-batch term (query against every positive), each a loop over the Matryoshka dims, descending from D, the n-th
  weighted ``1 / (n sqrt(D / d))`` on L2-normalized prefixes;
* ``total = (in_batch + hard) / number of exits``.

f2llm's trainer step (plain, gradient cache, packed) must give that loss and every parameter's gradient.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from f2llm.config import ConfigError, load_config
from f2llm.data import pad_sequences
from f2llm.distributed import Runtime
from f2llm.encoder import Encoder, ml_embed_exits
from f2llm.trainer import Trainer
from tests.helpers import tiny_qwen3, train_step_with_gradients, trainer_workdir

TEMPERATURE = 0.05
DIMS = (8, 16, 32)  # hidden 64: levels 64, 32, 16, 8
LAYERS = 5  # ML-Embed's rule on 5 layers: exits 1, 2, 4, 5


# ------------------------------------------------------------------------------------------------ the reference
def reference_exit_embeddings(model: torch.nn.Module, seqs: list[np.ndarray], exits: list[int], pad: int) -> list:
    """ML-Embed's per-exit last-token embeddings [n, D] (float64, with autograd), right-padded batch."""
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.full((len(seqs), int(lengths.max())), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    last = model.config.num_hidden_layers
    rows = torch.arange(len(seqs))
    embeddings = []
    for k in exits:
        hidden = out.hidden_states[k] if k == last else model.norm(out.hidden_states[k])
        embeddings.append(hidden[rows, lengths - 1])
    return embeddings


def ml_embed_total(exit_embeddings: list, B: int, k: int, in_batch: bool) -> torch.Tensor:
    """``(in_batch + hard) / len(outputs)``, every term a loop over ML-Embed's Matryoshka dims."""
    D = exit_embeddings[0].shape[-1]
    dims = sorted({d for d in DIMS if d < D} | {D}, reverse=True)
    hard = in_batch_loss = torch.zeros((), dtype=torch.float64)
    for emb in exit_embeddings:
        q, pos, neg = emb[:B], emb[B : 2 * B], emb[2 * B :].reshape(B, k, D)
        for n, d in enumerate(dims, start=1):
            weight = 1 / (n * math.sqrt(D / d))
            qd = F.normalize(q[:, :d], dim=-1)
            group = F.normalize(torch.cat([pos[:, None], neg], 1)[..., :d], dim=-1)
            logits = (qd[:, None] * group).sum(-1) / TEMPERATURE
            hard = hard + weight * F.cross_entropy(logits, torch.zeros(B, dtype=torch.long))
            if in_batch:
                scores = qd @ F.normalize(pos[:, :d], dim=-1).T / TEMPERATURE
                in_batch_loss = in_batch_loss + weight * F.cross_entropy(scores, torch.arange(B))
    return (in_batch_loss + hard) / len(exit_embeddings)


# ------------------------------------------------------------------------------------------------ f2llm's step
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("layer_exits")
    trainer_workdir(root)
    tiny_qwen3(root, seed=3, name="tiny-qwen3-deep", num_hidden_layers=LAYERS)
    return root


def one_step(workdir: Path, out: Path, *overrides: str) -> dict:
    """One Trainer.train_step on the first retrieval batch with ML-Embed's exits and Matryoshka dims: the step's
    result, its batch and the parameter gradients before the update."""
    config = load_config(
        workdir / "base.yaml",
        [
            f"output_dir={out}",
            f"model.name_or_path={workdir / 'tiny-qwen3-deep'}",
            "model.layer_exits=ml-embed",
            f"loss.matryoshka_dims={list(DIMS)}",
            *overrides,
        ],
    )
    trainer = Trainer.from_config(config, Runtime(rank=0, world_size=1, device=torch.device("cpu")))
    result, batch, grads = train_step_with_gradients(trainer)
    return {"result": result, "batch": batch, "trainer": trainer, "grads": grads}


def reference_step(workdir: Path, batch, pad: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = AutoModel.from_pretrained(workdir / "tiny-qwen3-deep", dtype=torch.float64)
    exits = list(ml_embed_exits(LAYERS))
    embeddings = reference_exit_embeddings(model, batch.sequences(), exits, pad)
    total = ml_embed_total(embeddings, batch.batch_size, batch.num_negatives, in_batch=True)
    total.backward()
    return total.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def relative_error(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert ours.keys() == ref.keys() and ours
    num = sum(((ours[n].double() - g) ** 2).sum() for n, g in ref.items())
    return float((num / sum((g**2).sum() for g in ref.values())).sqrt())


@pytest.fixture(scope="module")
def plain(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return one_step(workdir, tmp_path_factory.mktemp("plain"))


def test_ml_embed_rule() -> None:
    assert ml_embed_exits(28) == (1, 2, 4, 8, 16, 24, 28)  # Qwen3-0.6B
    assert ml_embed_exits(36) == (1, 2, 4, 8, 16, 24, 32, 36)  # Qwen3-4B
    assert ml_embed_exits(48) == (1, 2, 4, 8, 16, 24, 32, 40, 48)
    assert ml_embed_exits(6) == (1, 2, 4, 6)  # all-MiniLM-L6-v2
    assert ml_embed_exits(1) == (1,)


def test_step_equals_ml_embed_formulas(plain: dict, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Loss and every parameter gradient of f2llm's step = ML-Embed's loop over exits and dims (float64)."""
    trainer, batch = plain["trainer"], plain["batch"]
    assert trainer.encoder.layer_exits == (1, 2, 4, 5)
    total, grads = reference_step(workdir, batch, trainer.encoder.text_tokenizer.pad_token_id)
    torch.testing.assert_close(plain["result"].loss.total.double(), total, rtol=1e-5, atol=1e-6)
    assert relative_error(plain["grads"], grads) < 1e-5
    # Every layer trains, the first through exit 1 as well: a layer's gradient without the deeper exits differs.
    assert all(g.abs().sum() > 0 for g in plain["grads"].values())


@pytest.mark.parametrize(
    "overrides",
    [
        ("grad_cache.enabled=true", "grad_cache.chunk_texts=5"),
        ("grad_cache.enabled=true", "grad_cache.chunk_tokens=60", "data.packing=true", "data.max_tokens=64"),
        ("data.packing=true", "data.max_tokens=96"),
    ],
    ids=["gradcache", "gradcache-packed", "packed"],
)
def test_gradient_cache_and_packing_give_the_same_step(
    plain: dict, workdir: Path, tmp_path: Path, overrides: tuple[str, ...]
) -> None:
    """Every exit's embeddings go through the gradient cache (one surrogate per chunk) and packing unchanged."""
    other = one_step(workdir, tmp_path, *overrides)
    for a, b in zip(other["result"].loss, plain["result"].loss, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert relative_error(other["grads"], {n: g.double() for n, g in plain["grads"].items()}) < 1e-5


def test_one_exit_at_the_last_layer_is_the_plain_step(workdir: Path, tmp_path: Path) -> None:
    """layer_exits [last] trains exactly what no exits trains (the exit axis changes nothing by itself)."""
    exits = one_step(workdir, tmp_path / "exits", f"model.layer_exits=[{LAYERS}]")
    plain = one_step(workdir, tmp_path / "none", "model.layer_exits=null")
    for a, b in zip(exits["result"].loss, plain["result"].loss, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert relative_error(exits["grads"], {n: g.double() for n, g in plain["grads"].items()}) < 1e-6


def test_inference_embeds_with_the_last_layer(plain: dict) -> None:
    """encode() gives the full model's embeddings whatever exits train: the last exit's."""
    encoder: Encoder = plain["trainer"].encoder
    texts = ["a short text", "another, somewhat longer text to embed"]
    full = torch.from_numpy(encoder.encode(texts, show_progress=False))
    assert full.shape == (2, 64)
    batch = pad_sequences(encoder.tokenize(texts), encoder.text_tokenizer.pad_token_id)
    with torch.no_grad():
        every_exit = encoder(batch)
    assert every_exit.shape == (2, 4, 64)
    torch.testing.assert_close(every_exit[:, -1], full)
    # encode(layer_exits=True): the whole family from one pass, each exit as the forward gives it.
    family = torch.from_numpy(encoder.encode(texts, show_progress=False, layer_exits=True))
    torch.testing.assert_close(family, every_exit, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ bad settings
@pytest.mark.parametrize(
    ("exits", "message"),
    [
        ("[0, 2]", "distinct layer numbers >= 1"),
        ("[2, 2]", "distinct layer numbers >= 1"),
        (f"[1, {LAYERS + 1}]", f"exits are 1..{LAYERS}"),
        ("deepest", "matches none"),
    ],
)
def test_bad_exits_are_refused_before_the_first_step(workdir: Path, tmp_path: Path, exits: str, message: str) -> None:
    overrides = [f"output_dir={tmp_path}", f"model.name_or_path={workdir / 'tiny-qwen3-deep'}"]
    with pytest.raises((ConfigError, ValueError), match=message):
        config = load_config(workdir / "base.yaml", [*overrides, f"model.layer_exits={exits}"])
        Trainer.from_config(config, Runtime(rank=0, world_size=1, device=torch.device("cpu")))


def test_distillation_per_exit_equals_ml_embed(workdir: Path, tmp_path: Path) -> None:
    """A live teacher with exits: ML-Embed's ``(in_batch + hard + w * kd) / E``, kd summing over exits i the MSE of
    the student's raw exit-i embeddings against the teacher's exit i cut to the student's width (the teacher's
    exits by the same rule on its own depth: 6 layers -> 1, 2, 4, 6)."""
    teacher_path = tiny_qwen3(workdir, seed=5, name="tiny-qwen3-teacher", num_hidden_layers=6, hidden_size=80)
    step = one_step(workdir, tmp_path, f"distill.teacher={teacher_path}", "distill.weight=0.5")
    batch, B, k = step["batch"], step["batch"].batch_size, step["batch"].num_negatives
    pad = step["trainer"].encoder.text_tokenizer.pad_token_id
    student = AutoModel.from_pretrained(workdir / "tiny-qwen3-deep", dtype=torch.float64)
    teacher = AutoModel.from_pretrained(teacher_path, dtype=torch.float64)
    ours = reference_exit_embeddings(student, batch.sequences(), list(ml_embed_exits(LAYERS)), pad)
    with torch.no_grad():
        theirs = reference_exit_embeddings(teacher, batch.sequences(), [1, 2, 4, 6], pad)
    kd = torch.zeros((), dtype=torch.float64)
    for s, t in zip(ours, theirs, strict=True):
        t = t[:, : s.shape[-1]]
        kd = kd + F.mse_loss(s[:B], t[:B]) + F.mse_loss(s[B : 2 * B], t[B : 2 * B]) + F.mse_loss(s[2 * B :], t[2 * B :])
    total = ml_embed_total(ours, B, k, in_batch=True) + 0.5 * kd / len(ours)
    total.backward()
    torch.testing.assert_close(step["result"].loss.total.double(), total.detach(), rtol=1e-5, atol=1e-6)
    ref = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert relative_error(step["grads"], ref) < 1e-5


def test_distillation_with_exits_is_refused_where_exits_cannot_pair(workdir: Path, tmp_path: Path) -> None:
    """A teacher whose depth gives another number of exits, or precomputed (last-layer) teacher embeddings."""
    overrides = [f"output_dir={tmp_path}", f"model.name_or_path={workdir / 'tiny-qwen3-deep'}"]
    config = load_config(
        workdir / "base.yaml", [*overrides, "model.layer_exits=ml-embed", f"distill.teacher={workdir / 'tiny-qwen3-0'}"]
    )
    with pytest.raises(ConfigError, match=r"teacher exits \[1, 2\] and the student \[1, 2, 4, 5\]"):
        Trainer.from_config(config, Runtime(rank=0, world_size=1, device=torch.device("cpu")))
    (tmp_path / "t.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"model\.layer_exits with distill\.embeddings"):
        load_config(
            workdir / "base.yaml",
            [*overrides, "model.layer_exits=ml-embed", f"distill.embeddings={tmp_path / 't.parquet'}"],
        )


def test_a_decoder_without_a_final_norm_is_refused(plain: dict) -> None:
    encoder: Encoder = plain["trainer"].encoder
    norm = encoder.model.norm
    try:
        del encoder.model.norm
        with pytest.raises(ValueError, match=r"no final norm"):
            encoder.set_layer_exits([1, LAYERS])
        encoder.set_layer_exits([LAYERS])  # the last layer alone needs none
    finally:
        encoder.model.norm = norm
        encoder.set_layer_exits("ml-embed")


# ------------------------------------------------------------------------------------------------ ranks, engines, LoRA
EXIT_RUN = ("model.layer_exits=ml-embed", f"loss.matryoshka_dims={list(DIMS)}".replace(" ", ""))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_zero2_gradient_cache_train_like_one_rank_with_all_three_axes(workdir: Path, tmp_path: Path) -> None:
    """4 steps with exits + Matryoshka + the embedding factorized at rank 48 (ML-Embed's three axes): 2 gloo ranks
    under DeepSpeed ZeRO-2 with 3-text gradient-cache chunks and packing end at the weights (and logged losses) of
    one DDP process with the whole batch."""
    from tests.helpers import ROOT, assert_same_weights, metrics, run, train_command

    model = f"model.name_or_path={workdir / 'tiny-qwen3-deep'}"
    one = tmp_path / "one"
    run(train_command(workdir, one, model, *EXIT_RUN, "model.embedding_rank=48", "data.batch_size=4"))
    two = tmp_path / "two"
    zero2 = ("engine=deepspeed", f"deepspeed_config={ROOT / 'train' / 'configs' / 'zero2.json'}")
    chunks = ("grad_cache.enabled=true", "grad_cache.chunk_texts=3", "data.packing=true", "data.max_tokens=128")
    rank = "model.embedding_rank=48"
    stdout = run(train_command(workdir, two, model, *EXIT_RUN, rank, "data.batch_size=2", *zero2, *chunks, nproc=2))
    assert "layer exits [1, 2, 4, 5] of 5 layers" in stdout and "U @ V at rank 48" in stdout
    # AdamW divides each update by the gradient's running RMS, so elements whose gradients are near zero turn float32
    # reduction-order noise (a different chunking and rank split) into visible weight differences: measured 1.5e-5
    # after 4 steps at lr 1e-3 on this 5-layer model, where a wrong gradient moves weights by ~lr per step.
    assert_same_weights(one, two, atol=5e-5)
    for a, b in zip(metrics(one), metrics(two), strict=True):
        for key in ("train/loss", "train/hard", "train/in_batch", "val/loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_lora_trains_the_adapters_of_every_exit(plain: dict, workdir: Path, tmp_path: Path) -> None:
    """With LoRA the step's loss is the full model's at initialisation (the adapters start at zero) and the adapters
    of the first layer get gradient (exit 1 reaches them through the final norm, as the deeper exits do)."""
    lora = one_step(workdir, tmp_path, "model.lora={}")
    torch.testing.assert_close(lora["result"].loss.total, plain["result"].loss.total, rtol=1e-6, atol=1e-7)
    grads = lora["grads"]
    assert grads and all("lora_" in n for n in grads)
    assert any("layers.0." in n and g.abs().sum() > 0 for n, g in grads.items())


def test_an_exported_member_embeds_as_the_trained_exit(plain: dict, tmp_path: Path) -> None:
    """`f2llm export --layers 2 --dim 32` of a model trained with exits: its embeddings (Encoder.load and
    sentence-transformers) are the trained model's exit-2 embeddings cut to 32 and normalized."""
    from sentence_transformers import SentenceTransformer

    from f2llm.export import export_member

    encoder: Encoder = plain["trainer"].encoder
    encoder.save_pretrained(tmp_path / "trained")
    export_member(tmp_path / "trained", tmp_path / "member", layers=2, dim=32)
    texts = ["a short text", "another, somewhat longer text to embed", "x"]
    batch = pad_sequences(encoder.tokenize(texts), encoder.text_tokenizer.pad_token_id)
    encoder.eval()
    with torch.no_grad():
        exit_2 = encoder(batch, normalize=False)[:, encoder.layer_exits.index(2)]
    encoder.train()
    expected = F.normalize(exit_2[:, :32], dim=-1)
    member = Encoder.load(tmp_path / "member", device="cpu")
    assert member.num_layers == 2 and member.embedding_dim == 32
    torch.testing.assert_close(torch.from_numpy(member.encode(texts, show_progress=False)), expected, atol=1e-5, rtol=0)
    st = SentenceTransformer(str(tmp_path / "member"), device="cpu")
    torch.testing.assert_close(torch.from_numpy(st.encode(texts)), expected, atol=1e-5, rtol=0)
