"""Distillation (F2LLM v2): the kd term, the trainer step with a live or precomputed teacher, the gradient cache."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from f2llm.cli import main as cli_main
from f2llm.config import ConfigError, load_config
from f2llm.data import DataError, format_query
from f2llm.data.sources import INSTRUCTIONS
from f2llm.distill import LiveTeacher, distill_loss
from f2llm.model import Encoder
from f2llm.trainer import Runtime, Trainer
from tests.helpers import make_rows, metrics, tiny_qwen3, trainer_workdir

datasets.disable_progress_bars()
STUDENT_DIM = 64  # tests.helpers.tiny_qwen3's hidden size


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = trainer_workdir(tmp_path_factory.mktemp("distill"))
    tiny_qwen3(root, seed=2, hidden_size=96)  # the teacher: wider than the student, as kd allows
    tiny_qwen3(root, seed=3, hidden_size=32)  # too narrow to teach a 64-dimensional student
    return root


def make_trainer(workdir: Path, out: Path, *overrides: str) -> Trainer:
    config = load_config(workdir / "base.yaml", [f"output_dir={out}", *overrides])
    return Trainer.from_config(config, Runtime(rank=0, world_size=1, device=torch.device("cpu")))


def live(workdir: Path) -> str:
    return f"distill.teacher={workdir / 'tiny-qwen3-2'}"


def retrieval_batch(trainer: Trainer):
    """The first msmarco batch of epoch 0 (negatives and in-batch term both present)."""
    for step in range(trainer.sampler.steps_per_epoch):
        batch = trainer.sampler.batch_at(0, step)
        if batch.source == "msmarco":
            return batch
    raise AssertionError("no msmarco batch")


def step_capturing_gradients(trainer: Trainer, batch) -> tuple[object, dict[str, torch.Tensor]]:
    """trainer.train_step(batch), and the parameters' gradients as the optimizer would see them."""
    grads: dict[str, torch.Tensor] = {}
    original = trainer.engine.step

    def step(check):
        grads.update({n: p.grad.clone() for n, p in trainer.encoder.named_parameters() if p.grad is not None})
        return original(check)

    trainer.engine.step = step
    return trainer.train_step(batch), grads


# ------------------------------------------------------------------------------------------------ the kd term
def test_distill_loss_against_a_hand_computation() -> None:
    # B = 1 query, k = 2 negatives, student d = 2, teacher D = 3 (its last coordinate is never compared).
    student = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.0], [1.0, 1.0]])
    teacher = torch.tensor([[0.0, 2.0, 9.0], [1.0, 1.0, 9.0], [1.0, 0.0, 9.0], [1.0, 3.0, 9.0]])
    # query: ((1-0)^2 + 0) / 2 = 0.5; positive: (1 + 4) / 2 = 2.5; negatives: (4 + 0 + 0 + 4) / 4 = 2.0
    assert float(distill_loss(student, teacher, batch_size=1, num_negatives=2)) == pytest.approx(5.0)
    # No negatives: their term is left out (v2 never trains with none; the mean of nothing is NaN).
    assert float(distill_loss(student[:2], teacher[:2], batch_size=1, num_negatives=0)) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="teacher must be"):
        distill_loss(student, teacher[:, :1], batch_size=1, num_negatives=2)


# ------------------------------------------------------------------------------------------------ trainer step
def reference_step(workdir: Path, batch, weight: float) -> tuple[float, float, dict[str, torch.Tensor]]:
    """The distillation step written from the formula, outside the trainer: (total, kd, gradients)."""
    from f2llm.data import Collator

    rows = make_rows(70, 3)  # the workdir's msmarco.parquet
    instruction = INSTRUCTIONS["msmarco"]  # a decoder gets the source's instruction on its queries
    texts = [format_query(rows[r]["query"], instruction) for r in batch.rows]
    texts += [rows[r]["passage"] for r in batch.rows]
    texts += [rows[r][f"negative_{j + 1}"] for r in batch.rows for j in batch.negative_columns]
    teacher = Encoder.from_pretrained(workdir / "tiny-qwen3-2", normalize=False)
    target = torch.from_numpy(teacher.encode(texts, show_progress=False))[:, :STUDENT_DIM]

    student = Encoder.from_pretrained(workdir / "tiny-qwen3-0", max_length=64, normalize=False)
    raw = student(Collator(student.text_tokenizer.pad_token_id, mode="padded")(batch.sequences()))
    B, k = batch.batch_size, batch.num_negatives
    emb = F.normalize(raw, dim=-1)
    q, p, n = emb[:B], emb[B : 2 * B], emb[2 * B :].reshape(B, k, -1)
    docs = torch.cat([p[:, None], n], dim=1)
    hard = F.cross_entropy(torch.einsum("bd,bjd->bj", q, docs) / 0.05, torch.zeros(B, dtype=torch.long))
    in_batch = F.cross_entropy(q @ p.T / 0.05, torch.arange(B))
    squared = (raw - target) ** 2
    kd = squared[:B].mean() + squared[B : 2 * B].mean() + squared[2 * B :].mean()
    total = hard + in_batch + weight * kd
    total.backward()
    grads = {f"model.{n}": p.grad for n, p in student.model.named_parameters() if p.grad is not None}
    return float(total.detach()), float(kd.detach()), grads


def test_step_with_a_live_teacher_matches_the_formula(workdir: Path, tmp_path: Path) -> None:
    trainer = make_trainer(workdir, tmp_path / "run", live(workdir), "distill.weight=0.5")
    assert isinstance(trainer.teacher, LiveTeacher)
    assert trainer.teacher.sources is not None  # its own tokenizer (max length 512, the student's is 64)
    batch = retrieval_batch(trainer)
    result, grads = step_capturing_gradients(trainer, batch)
    total, kd, ref_grads = reference_step(workdir, batch, weight=0.5)
    assert float(result.kd) == pytest.approx(kd, rel=1e-5) and kd > 0
    assert float(result.loss.total) == pytest.approx(total, rel=1e-5)
    assert float(result.loss.total) == pytest.approx(
        float(result.loss.hard) + float(result.loss.in_batch) + 0.5 * float(result.kd), rel=1e-6
    )
    assert grads.keys() == ref_grads.keys() and grads
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
    # The teacher stays frozen and out of the optimizer.
    assert not any(p.requires_grad for p in trainer.teacher.encoder.parameters())


def test_gradient_cache_equals_one_forward_with_distillation(workdir: Path, tmp_path: Path) -> None:
    plain = make_trainer(workdir, tmp_path / "plain", live(workdir))
    batch = retrieval_batch(plain)
    plain_result, plain_grads = step_capturing_gradients(plain, batch)
    cached = make_trainer(
        workdir, tmp_path / "cached", live(workdir), "grad_cache.enabled=true", "grad_cache.chunk_texts=5"
    )
    cached_result, cached_grads = step_capturing_gradients(cached, batch)
    assert float(cached_result.kd) == pytest.approx(float(plain_result.kd), rel=1e-5)
    assert float(cached_result.loss.total) == pytest.approx(float(plain_result.loss.total), rel=1e-5)
    assert cached_grads.keys() == plain_grads.keys()
    for name, ref in plain_grads.items():
        torch.testing.assert_close(cached_grads[name], ref, rtol=0, atol=1e-5, msg=f"gradient of {name}")


def test_a_teacher_identical_to_the_student_gives_zero_kd_on_shared_ids(workdir: Path, tmp_path: Path) -> None:
    """Same model, same tokenizer and max length: the teacher reads the student's ids and kd starts at 0."""
    trainer = make_trainer(
        workdir, tmp_path / "self", f"distill.teacher={workdir / 'tiny-qwen3-0'}", "model.max_length=512"
    )
    assert trainer.teacher.sources is None
    result, _ = step_capturing_gradients(trainer, retrieval_batch(trainer))
    assert float(result.kd) == pytest.approx(0.0, abs=1e-9)


def test_narrow_teacher_is_refused_before_training(workdir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dimension 32, fewer than the student's 64"):
        make_trainer(workdir, tmp_path / "run", f"distill.teacher={workdir / 'tiny-qwen3-3'}")


def test_training_logs_kd(workdir: Path, tmp_path: Path) -> None:
    make_trainer(workdir, tmp_path / "run", live(workdir), "optim.max_steps=2", "distill.weight=2.0").train()
    rows = [r for r in metrics(tmp_path / "run") if "train/loss" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["train/kd"] > 0
        assert r["train/loss"] == pytest.approx(r["train/hard"] + r["train/in_batch"] + 2.0 * r["train/kd"], rel=1e-6)


# ------------------------------------------------------------------------------------------------ precomputed
def encode_training_data(workdir: Path, output: Path, *files: str) -> None:
    args = ["encode", "--model", str(workdir / "tiny-qwen3-2"), "--output", str(output), "--no-progress"]
    assert cli_main([*args, "--training-data", *(str(workdir / "data" / f) for f in files)]) == 0


def test_precomputed_embeddings_give_the_live_teachers_kd(workdir: Path, tmp_path: Path) -> None:
    embeddings = tmp_path / "teacher.parquet"
    encode_training_data(workdir, embeddings, "msmarco.parquet", "banking77.parquet")
    live_trainer = make_trainer(workdir, tmp_path / "live", live(workdir))
    precomputed = make_trainer(workdir, tmp_path / "pre", f"distill.embeddings={embeddings}")
    for step in range(3):  # both kinds of source
        batch = live_trainer.sampler.batch_at(0, step)
        groups = [batch.batch_size * (2 + batch.num_negatives)]
        torch.testing.assert_close(
            precomputed.teacher.embed(batch, groups), live_trainer.teacher.embed(batch, groups), rtol=1e-4, atol=1e-5
        )
    batch = retrieval_batch(live_trainer)
    live_result, _ = step_capturing_gradients(live_trainer, batch)
    pre_result, _ = step_capturing_gradients(precomputed, batch)
    assert float(pre_result.kd) == pytest.approx(float(live_result.kd), rel=1e-4)


def test_a_text_missing_from_the_embeddings_is_an_error_before_training(workdir: Path, tmp_path: Path) -> None:
    embeddings = tmp_path / "msmarco-only.parquet"
    encode_training_data(workdir, embeddings, "msmarco.parquet")
    with pytest.raises(DataError) as e:
        make_trainer(workdir, tmp_path / "run", f"distill.embeddings={embeddings}")
    message = str(e.value)
    assert "banking77.parquet" in message and "row 0" in message and "field 'query'" in message


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["distill={}"], "set exactly one of distill.teacher"),
        (["distill.teacher=a", "distill.embeddings=b"], "set exactly one of distill.teacher"),
        (["distill.teacher=a", "distill.weight=0"], "distill.weight must be > 0"),
        (["distill.embeddings=/no/such/file.parquet"], "distill.embeddings: /no/such/file.parquet does not exist"),
        (["distill.teacher=a", "distill.temperature=2"], "unknown key"),
        (["distill.teacher=' '"], "distill.teacher is empty"),
    ],
)
def test_distill_config_is_validated(workdir: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(workdir / "base.yaml", overrides)


def test_distill_defaults_off(workdir: Path) -> None:
    config = load_config(workdir / "base.yaml")
    assert config.distill is None
    assert load_config(workdir / "base.yaml", ["distill.teacher=x"]).distill.weight == 1.0
    assert np.isclose(load_config(workdir / "base.yaml", ["distill.teacher=x", "distill.weight=3"]).distill.weight, 3)
