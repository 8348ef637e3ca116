"""LoRA training (peft) on the tiny Qwen3: adapters only, exactness with the gradient cache and checkpointing, the
merged final/ and its adapter, resume, extra saves for merging, 2-rank DDP and DeepSpeed ZeRO-2; the v2 schedule."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from f2llm.config import LoraConfig, load_config
from f2llm.distributed import Runtime
from f2llm.encoder import Encoder
from f2llm.engine import WarmupConstant
from f2llm.lora import LoraError
from f2llm.trainer import Trainer
from tests.helpers import ROOT, metrics, run, train_command, trainer_workdir, weights

LORA = "model.lora={r: 4, alpha: 8, dropout: 0.0}"
TEXTS = ["q 1 0 a man is playing", "What is the capital of France?", "b 3 1 two dogs run through the park"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trainer_workdir(tmp_path_factory.mktemp("lora"))


def single_process(workdir: Path, out: Path, *overrides: str) -> Trainer:
    config = load_config(workdir / "base.yaml", [f"output_dir={out}", *overrides])
    return Trainer.from_config(config, Runtime(rank=0, world_size=1, device=torch.device("cpu")))


def trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p for n, p in trainer.encoder.model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------ what trains
def test_only_the_adapters_train(workdir: Path, tmp_path: Path) -> None:
    trainer = single_process(workdir, tmp_path / "run", LORA, "optim.lr=1e-2", "optim.warmup_steps=0")
    params = trainable(trainer)
    # r x (in + out) per targeted projection of the tiny Qwen3 (hidden 64, 4 x 16 query heads, 2 x 16 key/value
    # heads, MLP 128), 2 layers: q 64+64, k 64+32, v 64+32, o 64+64, gate 64+128, up 64+128, down 128+64.
    assert sum(p.numel() for p in params.values()) == 4 * 2 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    assert all(".lora_A." in n or ".lora_B." in n for n in params)
    optimized = {id(p) for group in trainer.engine.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in params.values()}
    frozen = {n: p.detach().clone() for n, p in trainer.encoder.model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in params.items()}

    batch = trainer.sampler.batch_at(0, 0)
    losses = [float(trainer.train_step(batch).loss.total) for _ in range(6)]
    assert losses[-1] < 0.9 * losses[0], losses  # the same batch six times: the adapters fit it
    after = dict(trainer.encoder.model.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(after[name], before), f"frozen {name} changed"
        assert after[name].grad is None
    assert all(not torch.equal(after[n], adapters[n]) for n in adapters)  # every adapter moved (B from zero)


def test_unknown_target_module_is_refused_before_training(workdir: Path, tmp_path: Path) -> None:
    message = r"model\.lora\.target_modules: \['qkv'\] match no linear layer of .*tiny-qwen3.*'q_proj'"
    with pytest.raises(LoraError, match=message):
        single_process(workdir, tmp_path / "run", "model.lora={target_modules: [q_proj, qkv]}")


# ------------------------------------------------------------------------------------------------ exact gradients
def step_gradients(workdir: Path, out: Path, *overrides: str) -> dict[str, torch.Tensor]:
    """The adapters' gradients of the first step (random B, so that A gets gradient too); no update applied."""
    trainer = single_process(workdir, out, *overrides)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in trainable(trainer).items():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    captured: dict[str, torch.Tensor] = {}

    def capture() -> torch.Tensor:
        captured.update({n: p.grad.clone() for n, p in trainable(trainer).items()})
        return torch.tensor(0.0)

    trainer.engine.clip, trainer.engine.update = capture, lambda: None
    trainer.train_step(trainer.sampler.batch_at(0, 0))
    assert all(p.grad is None for p in trainer.encoder.model.parameters() if not p.requires_grad)
    return captured


def assert_same_gradients(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:  # relative norm error: fp32 sums in another order differ by ~1e-7 of the whole
        reference = a[name].double()
        assert reference.norm() > 0, name
        assert float((b[name].double() - reference).norm() / reference.norm()) < 1e-5, name


def test_gradient_cache_gives_the_adapters_the_same_gradients(workdir: Path, tmp_path: Path) -> None:
    plain = step_gradients(workdir, tmp_path / "plain", LORA)
    by_texts = step_gradients(workdir, tmp_path / "texts", LORA, "grad_cache.enabled=true", "grad_cache.chunk_texts=3")
    by_tokens = step_gradients(
        workdir, tmp_path / "tokens", LORA, "grad_cache.enabled=true", "grad_cache.chunk_tokens=40"
    )
    assert_same_gradients(plain, by_texts)
    assert_same_gradients(plain, by_tokens)


def test_gradient_checkpointing_gives_the_adapters_the_same_gradients(workdir: Path, tmp_path: Path) -> None:
    """Adapter dropout on: the recomputed forward must replay it (frozen inputs need no requires_grad: the
    checkpointing is non-reentrant)."""
    lora = "model.lora={r: 4, alpha: 8, dropout: 0.2}"
    kept = step_gradients(workdir, tmp_path / "kept", lora, "model.gradient_checkpointing=false")
    recomputed = step_gradients(workdir, tmp_path / "recomputed", lora, "model.gradient_checkpointing=true")
    assert_same_gradients(kept, recomputed)


# ------------------------------------------------------------------------------------------------ what is saved
def last_token_embeddings(folder: Path, texts: list[str]) -> np.ndarray:
    """Plain transformers: AutoModel + the saved tokenizer (which appends EOS), last token, L2 norm."""
    from transformers import AutoModel, AutoTokenizer

    model, tokenizer = AutoModel.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            assert ids[0, -1] == tokenizer.eos_token_id
            rows.append(torch.nn.functional.normalize(model(input_ids=ids).last_hidden_state[0, -1], dim=-1))
    return torch.stack(rows).numpy()


def test_final_is_the_merged_model_and_the_adapter_is_beside_it(workdir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, get_constant_schedule_with_warmup

    out = tmp_path / "run"
    trainer = single_process(workdir, out, LORA, "optim.schedule=constant_with_warmup", "optim.warmup_steps=3")
    final = trainer.train()
    in_memory = trainer.encoder.encode(TEXTS, show_progress=False)
    base = AutoModel.from_pretrained(str(workdir / "tiny-qwen3-0")).state_dict()
    merged = weights(out)
    assert merged.keys() == base.keys()  # plain backbone names, no LoRA tensors
    assert any(not torch.allclose(merged[k], base[k]) for k in base)  # the adapters are folded in
    close = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last_token_embeddings(final, TEXTS), in_memory, **close)
    np.testing.assert_allclose(SentenceTransformer(str(final), device="cpu").encode(TEXTS), in_memory, **close)
    np.testing.assert_allclose(Encoder.load(final).encode(TEXTS, show_progress=False), in_memory, **close)
    # The adapter alone, on the base model, with peft.
    base_model = AutoModel.from_pretrained(str(workdir / "tiny-qwen3-0"))
    adapted = PeftModel.from_pretrained(base_model, str(final / "adapter"))
    on_base = Encoder(adapted.base_model.model, trainer.encoder.tokenizer, max_length=64)
    np.testing.assert_allclose(on_base.encode(TEXTS, show_progress=False), in_memory, **close)
    # Checkpoints hold the adapters and their optimizer state, not the frozen backbone.
    checkpoint = out / "checkpoints" / "step-00000004"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "optimizer.pt", "rng-rank0.pt", "trainable.safetensors", "trainer_state.json"
    ]  # fmt: skip
    # optim.schedule: constant_with_warmup: transformers' schedule one step ahead (our first update already moves).
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    reference = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=3)
    expected = []
    for _ in range(4):
        optimizer.step()
        reference.step()
        expected.append(reference.get_last_lr()[0])
    assert [r["train/lr"] for r in metrics(out) if "train/lr" in r] == pytest.approx(expected, rel=1e-12)


def test_resume_continues_exactly_and_keeps_the_extra_saves(workdir: Path, tmp_path: Path) -> None:
    """Dropout in the backbone and the adapters; a run resumed from its step-2 checkpoint (later checkpoints, the
    last extra save and final/ lost, as after a kill) ends at the uninterrupted run's weights. save_extra
    {every: 2, last: 3} of 6 steps: the multiples of 2 after step 3."""
    settings = (
        f"model.name_or_path={workdir / 'tiny-qwen3-1'}", "model.lora={r: 4, alpha: 8, dropout: 0.1}",
        "optim.max_steps=6", "validate_every=100", "keep_last=5", "save_extra={every: 2, last: 3}",
    )  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    single_process(workdir, straight, *settings).train()
    assert sorted(p.name for p in (straight / "extra").iterdir()) == ["step-00000004", "step-00000006"]
    shutil.copytree(straight, resumed)
    for lost in ("checkpoints/step-00000004", "checkpoints/step-00000006", "final", "extra/step-00000006"):
        shutil.rmtree(resumed / lost)
    trainer = single_process(workdir, resumed, *settings)
    assert trainer.step == 2
    trainer.train()
    for folder in ("final", "final/adapter", "extra/step-00000004", "extra/step-00000006"):
        name = "adapter_model.safetensors" if folder.endswith("adapter") else "model.safetensors"
        a, b = load_file(str(straight / folder / name)), load_file(str(resumed / folder / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{folder}: {key} differs after resume"
    assert sorted(p.name for p in (resumed / "extra").iterdir()) == ["step-00000004", "step-00000006"]
    # The step-4 extra save is the model of step 4 (not final/'s).
    four, six = load_file(str(straight / "extra/step-00000004/model.safetensors")), weights(straight)
    assert any(not torch.equal(four[k], six[k]) for k in six)


def test_full_weights_resume_refuses_a_lora_checkpoint(workdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    single_process(workdir, out, LORA, "optim.max_steps=2").train()
    with pytest.raises(FileNotFoundError, match=r"has no model\.safetensors: it holds a LoRA run's adapters"):
        single_process(workdir, out, "optim.max_steps=4")


# ------------------------------------------------------------------------------------------------ engines, ranks
@pytest.fixture(scope="module")
def one_rank_lora(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lora-one-rank") / "run"
    single_process(workdir, out, LORA, "optim.max_steps=2", "data.batch_size=4").train()
    return out


def assert_same_final(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=atol, msg=key)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_two_ranks_train_the_adapters_like_one(workdir: Path, one_rank_lora: Path, tmp_path: Path, engine: str) -> None:
    """2 ranks x 2 queries (gloo) with the gradient cache by tokens end at the merged weights of 1 rank x 4."""
    ds = ("engine=deepspeed", f"deepspeed_config={ROOT / 'train' / 'configs' / 'zero2.json'}")
    overrides = (
        LORA,
        "optim.max_steps=2",
        "data.batch_size=2",
        "grad_cache.enabled=true",
        "grad_cache.chunk_tokens=40",
    )
    out = tmp_path / "run"
    stdout = run(train_command(workdir, out, *overrides, *(ds if engine == "zero2" else ()), nproc=2))
    assert "LoRA r=4" in stdout and "trainable of" in stdout
    assert_same_final(one_rank_lora, out, atol=1e-5)


@pytest.mark.slow
def test_zero2_lora_checkpoint_holds_the_adapters_and_resumes(workdir: Path, tmp_path: Path) -> None:
    """DeepSpeed ZeRO-2, one process: its checkpoint leaves the frozen backbone out; resuming from step 2 ends at
    the uninterrupted run's weights."""
    settings = (
        LORA, "engine=deepspeed", f"deepspeed_config={ROOT / 'train' / 'configs' / 'zero2.json'}",
        "optim.max_steps=4", "validate_every=100", "keep_last=5",
    )  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(train_command(workdir, straight, *settings))
    module_states = list((straight / "checkpoints" / "step-00000002").rglob("*model_states.pt"))
    saved = torch.load(module_states[0], map_location="cpu", weights_only=False)["module"]
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved), sorted(saved)[:4]
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    shutil.rmtree(resumed / "final")
    assert "at step 2 of 4" in run(train_command(workdir, resumed, *settings))
    a, b = load_file(str(straight / "final/model.safetensors")), load_file(str(resumed / "final/model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------ schedule
@pytest.mark.parametrize("world", [1, 4])
def test_constant_with_warmup_is_transformers_schedule(workdir: Path, world: int) -> None:
    """optim.schedule: constant_with_warmup against transformers' get_constant_schedule_with_warmup: warmup: steps is
    it one step ahead (the first update moves); per_process is it stepped `world` times per optimizer step (as the
    official code ran under accelerate); both floored at min_lr."""
    from transformers import get_constant_schedule_with_warmup

    warmup, lr, min_lr, total = 12, 1e-3, 1e-5, 30
    for mode in ("steps", "per_process"):
        overrides = [
            "optim.schedule=constant_with_warmup", f"optim.warmup={mode}", f"optim.warmup_steps={warmup}",
            f"optim.lr={lr}", f"optim.min_lr={min_lr}",
        ]  # fmt: skip
        ours = WarmupConstant.from_config(load_config(workdir / "base.yaml", overrides), total, world_size=world)
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        hf = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)
        per_step = world if mode == "per_process" else 1
        if mode == "steps":
            hf.step()
        for step in range(total):
            assert lr * ours(step) == pytest.approx(max(hf.get_last_lr()[0], min_lr), rel=1e-12), (mode, step)
            for _ in range(per_step):
                optimizer.step()
                hf.step()


def test_engine_uses_the_configured_schedule(workdir: Path, tmp_path: Path) -> None:
    trainer = single_process(workdir, tmp_path / "run", "optim.schedule=constant_with_warmup")
    assert isinstance(trainer.engine.scheduler.lr_lambdas[0], WarmupConstant)
    assert LoraConfig().target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
