"""Gradient checkpointing decided per forward by a memory budget: the activation estimate (meta device) against a
real forward's saved tensors, the per-chunk decision, exact gradients either way, ranks that decide differently,
and the step's host syncs (one finite check; none at all on the meta device)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from f2llm.config import load_config
from f2llm.data import pad_sequences
from f2llm.distributed import Runtime, free_port
from f2llm.encoder import Encoder
from f2llm.recompute import (
    ACTIVATION_MEMORY_SHARE,
    ActivationMemory,
    RecomputePolicy,
    activation_budget,
    saved_tensor_bytes,
)
from f2llm.trainer import Trainer
from tests.helpers import CORPUS, ROOT, assert_same_weights, run, trainer_workdir

WORKER = Path(__file__).with_name("recompute_worker.py")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trainer_workdir(tmp_path_factory.mktemp("checkpointing"))


@pytest.fixture(scope="module")
def qwen3_path(workdir: Path) -> Path:
    return workdir / "tiny-qwen3-0"


def make_trainer(workdir: Path, out: Path, *overrides: str, device: str = "cpu") -> Trainer:
    config = load_config(workdir / "base.yaml", [f"output_dir={out}", *overrides])
    return Trainer.from_config(config, Runtime(rank=0, world_size=1, device=torch.device(device)))


# ------------------------------------------------------------------------------------------------ the estimate
@pytest.mark.parametrize("compute", ["float32", "bfloat16-autocast"])
def test_estimate_matches_the_saved_tensors_of_a_real_forward(qwen3_path: Path, compute: str) -> None:
    """The meta-device estimate (fp32; bf16 emulating autocast over fp32 weights) against the bytes autograd really
    saves in a CPU forward of the same model (real tensors, torch's CPU autocast), at lengths it was not fit on."""
    encoder = Encoder.from_pretrained(qwen3_path, attn_implementation="sdpa").train()
    memory = ActivationMemory(encoder)
    dtype = torch.bfloat16 if compute != "float32" else None
    fixed, per_token = memory.profile(dtype)
    assert per_token > 0 and (fixed > 2**16) == (dtype is not None)  # autocast keeps bf16 copies of the weights
    weights = [*encoder.model.parameters(), *encoder.model.buffers()]
    for lengths in ([50], [120, 120], [300]):
        batch = pad_sequences([list(range(1, n + 1)) for n in lengths], 0)
        kwargs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            real = saved_tensor_bytes(lambda: encoder.model(**kwargs), weights)  # noqa: B023
        estimate = memory.bytes(batch.input_ids.numel(), dtype)
        assert estimate == pytest.approx(real, rel=0.01), (lengths, estimate, real)


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def real_saved_bytes(encoder: Encoder, lengths: list[int], autocast: bool) -> int:
    """Bytes autograd saves in a real CPU training forward of ``encoder``'s backbone (parameters left out) over a
    padded batch of texts of ``lengths`` tokens (max(lengths) x len(lengths) input positions)."""
    weights = [*encoder.model.parameters(), *encoder.model.buffers()]
    batch = pad_sequences([list(range(1, n + 1)) for n in lengths], 0)
    kwargs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return saved_tensor_bytes(lambda: encoder.model(**kwargs), weights)


@pytest.mark.parametrize("dropout", [0.05, 0.0])
@pytest.mark.parametrize("compute", ["float32", "bfloat16-autocast"])
def test_estimate_of_a_lora_model_matches_its_real_forward(qwen3_path: Path, compute: str, dropout: float) -> None:
    """With LoRA on every projection the estimate measures the model as it trains: dropout > 0 saves a mask and the
    dropped input per adapted layer (more than a full fine-tune), dropout 0 with frozen base weights less. Each
    against a real CPU forward of the LoRA model, at lengths the estimate was not fit on; a profile measured before
    the adapters were injected is not reused."""
    from f2llm.lora import LoraAdapter

    encoder = Encoder.from_pretrained(qwen3_path, attn_implementation="sdpa").train()
    memory = ActivationMemory(encoder)
    dtype = torch.bfloat16 if compute != "float32" else None
    _, full_per_token = memory.profile(dtype)
    LoraAdapter.apply(encoder, r=4, alpha=8, dropout=dropout, target_modules=ALL_PROJECTIONS, seed=0)
    for lengths in ([50], [120, 120], [300]):
        real = real_saved_bytes(encoder, lengths, autocast=dtype is not None)
        estimate = memory.bytes(max(lengths) * len(lengths), dtype)
        assert estimate == pytest.approx(real, rel=0.01), (lengths, estimate, real)
    _, per_token = memory.profile(dtype)
    assert (per_token > full_per_token) == (dropout > 0), (per_token, full_per_token)


def test_recompute_policy_of_a_lora_run_uses_the_lora_estimate(workdir: Path, tmp_path: Path) -> None:
    """The trainer's auto policy (built after the adapters are injected) predicts what the LoRA forward saves."""
    trainer = make_trainer(workdir, tmp_path / "run", "model.lora={r: 4, alpha: 8, dropout: 0.1}",
                           "model.gradient_checkpointing=auto", "model.activation_budget_gb=0.5")  # fmt: skip
    policy = trainer.recompute_policy()
    autocast = trainer.engine.compute_dtype != next(trainer.encoder.model.parameters()).dtype
    real = real_saved_bytes(trainer.encoder, [200], autocast=autocast)
    assert policy.activation_bytes(200) == pytest.approx(real, rel=0.01), (policy.activation_bytes(200), real)


def test_layer_saving_of_a_lora_model_is_what_its_first_layer_saves(qwen3_path: Path) -> None:
    """With LoRA (dropout 0.1, every projection) the embeddings are frozen: layer 0's input needs no gradient and
    its projections keep less than layer 1's. The per-layer saving the policy counts on is the smaller, layer 0's,
    as a real CPU forward measures it: checkpointing k layers never saves less than k times it."""
    from f2llm.lora import LoraAdapter

    encoder = Encoder.from_pretrained(qwen3_path, attn_implementation="sdpa").train()
    LoraAdapter.apply(encoder, r=4, alpha=8, dropout=0.1, target_modules=ALL_PROJECTIONS, seed=0)
    n_layers, saving = ActivationMemory(encoder).layer_saving()
    assert n_layers == 2 and saving > 0
    kept = {}
    for k in (0, 1, 2):
        with encoder.recompute(k):
            kept[k] = real_saved_bytes(encoder, [200], autocast=False)
    layer_input = encoder.model.config.hidden_size * 4
    assert kept[0] - kept[1] == pytest.approx((saving + layer_input) * 200, rel=0.02), (kept, saving)
    assert kept[1] - kept[2] > 1.1 * (kept[0] - kept[1])  # layer 1 saves clearly more: the layers differ
    assert kept[0] - kept[2] >= 2 * (saving + layer_input) * 200


def test_estimate_runs_once_per_compute_dtype(qwen3_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import f2llm.recompute

    encoder = Encoder.from_pretrained(qwen3_path)
    calls = []
    estimate = f2llm.recompute.estimate_activation_profile
    monkeypatch.setattr(
        f2llm.recompute, "estimate_activation_profile", lambda *a, **k: calls.append(a) or estimate(*a, **k)
    )
    memory = ActivationMemory(encoder)
    for n in (10, 100, 1000):
        memory.bytes(n)
        memory.bytes(n, torch.bfloat16)
    assert len(calls) == 2
    fixed, per_token = memory.profile()
    assert memory.bytes(1000) == fixed + 1000 * per_token


def test_estimate_of_a_liger_model_measures_the_plain_modules(
    qwen3_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Liger patches Qwen3's modeling module process-wide with Triton kernels that cannot run on meta: the estimate
    builds its meta model from the module as it was, and gets the unpatched model's numbers."""
    from transformers.models.qwen3 import modeling_qwen3

    from f2llm.liger import apply_liger_kernels

    for name in ("apply_rotary_pos_emb", "Qwen3RMSNorm", "Qwen3MLP"):
        monkeypatch.setattr(modeling_qwen3, name, getattr(modeling_qwen3, name))  # restored after the test
    plain = ActivationMemory(Encoder.from_pretrained(qwen3_path)).profile()
    encoder = Encoder.from_pretrained(qwen3_path)
    apply_liger_kernels(encoder.model)
    assert modeling_qwen3.Qwen3MLP.__name__ == "LigerSwiGLUMLP"
    assert ActivationMemory(encoder).profile() == plain
    assert modeling_qwen3.Qwen3MLP.__name__ == "LigerSwiGLUMLP"  # the patch is back


# ------------------------------------------------------------------------------------------------ the decision
def test_policy() -> None:
    per_token = lambda n: 100 + 10 * n  # noqa: E731
    assert [RecomputePolicy(True, None, per_token)(n) for n in (1, 10**6)] == [True, True]
    assert [RecomputePolicy(False, 0, per_token)(n) for n in (1, 10**6)] == [False, False]
    assert [RecomputePolicy("auto", 1100, per_token)(n) for n in (99, 100, 101)] == [False, False, True]
    assert RecomputePolicy("auto", None, per_token)(1)  # no budget known: as true
    assert "more than 100 tokens checkpoint" in RecomputePolicy("auto", 1100, per_token).summary()
    # Just enough layers: 4 layers, each saving 2 bytes per token when checkpointed.
    partial = RecomputePolicy("auto", 1100, per_token, layer_saving=(4, 2))
    assert partial.layers(100) is False  # 1100 bytes fit
    assert partial.layers(101) == 1  # 10 bytes over: one layer saves 202
    assert partial.layers(150) == 2  # 500 over: two layers save 600, one 300
    assert partial.layers(10**6) is True  # more than all four save
    assert [partial(n) for n in (100, 101)] == [False, True]


def test_layer_saving_matches_a_real_forward(qwen3_path: Path) -> None:
    """Checkpointing the first k layers of a real CPU forward removes what the meta estimate says per layer: the
    bytes autograd no longer saves, plus the layer input the checkpoint holds instead (hidden size x fp32)."""
    encoder = Encoder.from_pretrained(qwen3_path, attn_implementation="sdpa").train()
    n_layers, saving = ActivationMemory(encoder).layer_saving()
    assert n_layers == encoder.num_recompute_layers == len(encoder.model.layers) == 2 and saving > 0
    weights = [*encoder.model.parameters(), *encoder.model.buffers()]
    batch = pad_sequences([list(range(1, 201))], 0)
    kwargs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    kept = {}
    for k in (0, 1, 2):
        with encoder.recompute(k):
            assert encoder.recomputed_layers == k
            kept[k] = saved_tensor_bytes(lambda: encoder.model(**kwargs), weights)
    layer_input = encoder.model.config.hidden_size * 4
    for k in (1, 2):
        assert kept[0] - kept[k] == pytest.approx(k * (saving + layer_input) * 200, rel=0.02), (k, kept, saving)


def test_recomputing_the_first_layers_only(qwen3_path: Path) -> None:
    """recompute(1) recomputes layer 0 alone in backward, with the gradients of no recompute."""
    encoder = Encoder.from_pretrained(qwen3_path).train()
    calls = [0, 0]
    for i, layer in enumerate(encoder.model.layers):
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = encoder.tokenize(CORPUS[:4])
    weights = torch.randn(4, encoder.embedding_dim)
    grads = []
    for layers in (1, False):
        calls[:] = [0, 0]
        encoder.zero_grad()
        with encoder.recompute(layers):
            (encoder(pad_sequences(ids, 0)) * weights).sum().backward()
        assert calls == ([2, 1] if layers else [1, 1])
        grads.append([p.grad.clone() for p in encoder.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    with pytest.raises(ValueError, match="cannot recompute 3 of the model's 2 layers"):
        encoder.set_recompute(3)


def record_forwards(trainer: Trainer) -> list[dict]:
    """Each engine forward (its input positions, whether it builds a graph) and the MLP calls of decoder layer 0 until
    the next forward: 1 per forward, +1 when backward recomputes the checkpointed layer."""
    events: list[dict] = []
    trainer.encoder.model.layers[0].mlp.register_forward_pre_hook(
        lambda m, a: events[-1].update(mlp=events[-1]["mlp"] + 1)
    )
    forward = trainer.engine.forward

    def recording(batch, normalize=None):
        events.append({"tokens": batch.input_ids.numel(), "grad": torch.is_grad_enabled(), "mlp": 0})
        return forward(batch, normalize)

    trainer.engine.forward = recording
    return events


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_budget_recomputes_only_the_chunks_that_do_not_fit(workdir: Path, tmp_path: Path, layout: str) -> None:
    """Gradient cache, pass 2: a budget between two chunks' estimates checkpoints the larger chunk only; pass 1
    (no grad) never."""
    chunking = (
        ["grad_cache.chunk_texts=3"] if layout == "padded" else ["data.packing=true", "grad_cache.chunk_tokens=60"]
    )
    trainer = make_trainer(workdir, tmp_path / "run", "grad_cache.enabled=true", *chunking)
    batch = next(iter(trainer.sampler))
    sizes = sorted({c.input_ids.numel() for c in trainer.chunks(batch.sequences())})
    assert len(sizes) > 1, sizes
    threshold = sizes[len(sizes) // 2 - 1]
    memory = ActivationMemory(trainer.encoder)
    budget = memory.bytes(threshold)
    trainer.recompute = RecomputePolicy("auto", budget, memory.bytes)
    events = record_forwards(trainer)
    trainer.train_step(batch)
    no_grad, with_grad = [e for e in events if not e["grad"]], [e for e in events if e["grad"]]
    assert len(no_grad) == len(with_grad) and all(e["mlp"] == 1 for e in no_grad)
    checkpointed = [e["mlp"] == 2 for e in with_grad]
    assert checkpointed == [e["tokens"] > threshold for e in with_grad] and any(checkpointed) and not all(checkpointed)
    assert all(e["mlp"] in (1, 2) for e in with_grad)


@pytest.mark.parametrize("grad_cache", ["false", "true"])
def test_recompute_leaves_gradients_identical(workdir: Path, tmp_path: Path, grad_cache: str) -> None:
    """fp32 on CPU: a step checkpointing every forward and a step checkpointing none update to the same weights,
    bit for bit (the recomputed forward is the same computation)."""
    states = []
    for mode in ("true", "false"):
        trainer = make_trainer(workdir, tmp_path / mode, f"model.gradient_checkpointing={mode}",
                               f"grad_cache.enabled={grad_cache}", "grad_cache.chunk_texts=5")  # fmt: skip
        events = record_forwards(trainer)
        trainer.train_step(next(iter(trainer.sampler)))
        assert all(e["mlp"] == (2 if mode == "true" and e["grad"] else 1) for e in events), events
        states.append(trainer.encoder.model.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_encoder_recompute_context(qwen3_path: Path) -> None:
    encoder = Encoder.from_pretrained(qwen3_path).train()
    assert not encoder.recompute_enabled
    ids = encoder.tokenize(CORPUS[:5])
    weights = torch.randn(5, encoder.embedding_dim)
    grads = []
    for enabled in (True, False):
        encoder.zero_grad()
        with encoder.recompute(enabled):
            assert encoder.recompute_enabled == enabled
            (encoder(pad_sequences(ids, 0)) * weights).sum().backward()
        grads.append([p.grad.clone() for p in encoder.parameters()])
    assert not encoder.recompute_enabled  # restored
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    assert Encoder.from_pretrained(qwen3_path, recompute=True).recompute_enabled


def test_trainer_says_what_it_decided(workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_trainer(workdir, tmp_path / "a", "model.gradient_checkpointing=auto")
    said = capsys.readouterr().out
    assert "gradient checkpointing auto: ~" in said and "KiB of saved activations per token" in said
    assert "no memory budget known" in said and "every forward with grad checkpoints" in said
    trainer = make_trainer(
        workdir, tmp_path / "b", "model.gradient_checkpointing=auto", "model.activation_budget_gb=0.5"
    )
    said = capsys.readouterr().out
    fixed, per_token = ActivationMemory(trainer.encoder).profile()
    assert (
        f"budget 0.50 GiB (model.activation_budget_gb): forwards of more than {(2**29 - fixed) // per_token:,} tokens"
        in said
    )
    make_trainer(workdir, tmp_path / "c", "model.gradient_checkpointing=false")
    assert "gradient checkpointing off in every forward with grad" in capsys.readouterr().out


def test_budget_from_device_memory(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA, without activation_budget_gb: a share of the free memory left once gradients and AdamW moments are
    allocated (reported by a stand-in for the CUDA memory queries)."""
    trainer = make_trainer(workdir, tmp_path / "run")
    numel = sum(p.numel() for p in trainer.encoder.parameters() if p.requires_grad)
    assert trainer.engine.step_state_bytes() == 4 * numel + 8 * numel  # fp32 gradients and two moments, 1 rank
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2**29)
    free = 10 * 2**30 + 2**29 - trainer.engine.step_state_bytes()
    assert activation_budget(trainer.engine, torch.device("cuda", 0)) == int(ACTIVATION_MEMORY_SHARE * free)
    assert activation_budget(trainer.engine, torch.device("cpu")) is None


# ------------------------------------------------------------------------------------------------ host syncs
@pytest.mark.parametrize("grad_cache", ["false", "true"])
def test_one_finite_check_per_step(workdir: Path, tmp_path: Path, grad_cache: str) -> None:
    """Loss and gradient norm are checked in one all-reduce (and one host read), inside the engine's step."""
    trainer = make_trainer(workdir, tmp_path / "run", f"grad_cache.enabled={grad_cache}", "grad_cache.chunk_texts=3")
    calls = []
    failed_anywhere = trainer.runtime.failed_anywhere
    trainer.runtime.failed_anywhere = lambda flags: calls.append(flags.tolist()) or failed_anywhere(flags)
    trainer.runtime.any_failed = lambda failed: pytest.fail("a second check")
    result = trainer.train_step(next(iter(trainer.sampler)))
    assert calls == [[False, False]]
    assert isinstance(result.grad_norm, torch.Tensor) and float(result.grad_norm) > 0
    assert trainer.loss_fn.equal_batches  # every rank holds the same batch size: no size exchange


@pytest.mark.parametrize(("layout", "grad_cache"), [("padded", "false"), ("packed", "true"), ("padded", "true")])
def test_train_step_on_the_meta_device(workdir: Path, tmp_path: Path, layout: str, grad_cache: str) -> None:
    """A whole step (collate, checkpoint decisions, forward, loss, backward, clip, update) with the model on the meta
    device, where any read of a tensor's value fails: the step needs none beyond its finite check, which meta skips."""
    trainer = make_trainer(
        workdir, tmp_path / "run", "model.attn_implementation=f2llm_varlen", "model.gradient_checkpointing=auto",
        "model.activation_budget_gb=0.0005", f"data.packing={layout == 'packed'}", "data.max_tokens=128",
        f"grad_cache.enabled={grad_cache}", "grad_cache.chunk_tokens=60", device="meta",
    )  # fmt: skip
    assert trainer.encoder.device.type == "meta"
    events = record_forwards(trainer)
    result = trainer.train_step(next(iter(trainer.sampler)))
    assert result.loss.total.device.type == "meta" and result.grad_norm.device.type == "meta"
    budget = trainer.recompute_policy().budget
    assert budget == int(0.0005 * 2**30)
    expected = [e["grad"] and trainer.recompute_policy().activation_bytes(e["tokens"]) > budget for e in events]
    assert [e["mlp"] == 2 for e in events] == expected and any(expected), events


# ------------------------------------------------------------------------------------------------ ranks disagree
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
def test_ranks_may_recompute_differently(workdir: Path, tmp_path: Path, engine: str) -> None:
    """2 ranks, gradient cache by tokens (the ranks' chunks differ): rank 0's policy checkpoints every forward with
    grad, rank 1's none. DDP and ZeRO-2: no collective changes (the all-reduce, the reduce-scatter per chunk), each
    rank does as it decided. ZeRO-3, every parameter partitioned (a recomputed layer gathers its parameters again):
    both ranks checkpoint, or their gathers would not match. Either way the run ends at the weights of the run
    where no rank checkpoints, bit for bit."""
    zero3 = json.loads((ROOT / "train" / "configs" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # the tiny model's matrices partitioned
    (tmp_path / "zero3.json").write_text(json.dumps(zero3))
    engines = {
        "ddp": [],
        "zero2": ["engine=deepspeed", f"deepspeed_config={ROOT / 'train' / 'configs' / 'zero2.json'}"],
        "zero3": ["engine=deepspeed", f"deepspeed_config={tmp_path / 'zero3.json'}"],
    }
    settings = ["data.batch_size=2", "grad_cache.enabled=true", "grad_cache.chunk_tokens=40", "data.packing=true",
                "data.max_tokens=128", "validate_every=100", *engines[engine]]  # fmt: skip
    runs = {}
    for mode in ("mixed", "none"):
        out = tmp_path / mode
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}"]
        run([*launch, str(WORKER), mode, str(workdir / "base.yaml"), f"output_dir={out}", *settings])
        runs[mode] = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    mixed = runs["mixed"]
    assert mixed[0]["recomputed"] == mixed[0]["grad_forwards"] > 0
    if engine == "zero3":
        assert mixed[1]["recomputed"] == mixed[1]["grad_forwards"] > 0
    else:
        assert mixed[1]["recomputed"] == 0
    assert all(r["recomputed"] == 0 for r in runs["none"])
    assert_same_weights(tmp_path / "mixed", tmp_path / "none", atol=0)
