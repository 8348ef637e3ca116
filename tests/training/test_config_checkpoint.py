"""Training config parsing and atomic checkpoints."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from f2llm.checkpoint import (
    CheckpointWriter,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
)
from f2llm.config import ConfigError, load_config

MINIMAL = "model:\n  name_or_path: some/model\ndata:\n  paths: [a.parquet]\n"
CONFIGS = Path(__file__).resolve().parents[2] / "train" / "configs"
ZERO2 = CONFIGS / "zero2.json"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_recipe(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.optim.betas == (0.9, 0.98) and config.optim.weight_decay == 0.01
    assert config.optim.warmup_steps == 500 and config.optim.epochs == 2 and config.optim.grad_clip == 1.0
    assert config.optim.min_lr == 1e-7 and config.loss.temperature == 0.05 and config.data.rank_batch_size(32) == 16
    assert config.data.validation_fraction == 0.01 and config.model.max_length == 1024


def test_gradient_checkpointing_modes(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.model.gradient_checkpointing == "auto" and config.model.activation_budget_gb is None
    for value, want in (("true", True), ("false", False), ("auto", "auto")):
        assert (
            load_config(
                write(tmp_path, MINIMAL), [f"model.gradient_checkpointing={value}"]
            ).model.gradient_checkpointing
            == want
        )
    assert load_config(write(tmp_path, MINIMAL), ["model.activation_budget_gb=12"]).model.activation_budget_gb == 12.0


def test_matryoshka_dims_from_yaml_and_overrides(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, MINIMAL)).loss.matryoshka_dims is None  # off by default, as in v1
    config = load_config(write(tmp_path, MINIMAL + "loss:\n  matryoshka_dims: [512, 64, 8]\n"))
    assert config.loss.matryoshka_dims == [512, 64, 8]
    assert load_config(write(tmp_path, MINIMAL), ["loss.matryoshka_dims=[8,16]"]).loss.matryoshka_dims == [8, 16]


def test_overrides_are_typed(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, MINIMAL),
        ["optim.lr=2e-5", "optim.betas=[0.8, 0.9]", "data.sources.mine={kind: retrieval}", "model.pooling=null"],
    )
    assert config.optim.lr == 2e-5 and config.optim.betas == (0.8, 0.9)
    assert config.data.sources["mine"].kind == "retrieval" and config.model.pooling is None


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (MINIMAL + "optim:\n  lr: fast\n", [], r"optim\.lr: expected float, got 'fast'"),
        (MINIMAL + "optim:\n  learning_rate: 1\n", [], r"unknown key\(s\) \['learning_rate'\]"),
        (MINIMAL, ["engine=horovod"], r"engine: 'horovod' is not one of"),
        (MINIMAL, ["data.batch_size=0"], r"data\.batch_size must be > 0"),
        (MINIMAL, ["data.global_batch_size=0"], r"data\.global_batch_size must be > 0"),
        (MINIMAL, ["data.batch_size=8", "data.global_batch_size=64"], r"are both set; set one"),
        (MINIMAL, ["optim.lr"], r"expected key\.path=value"),
        (MINIMAL, ["data.sources.x={kind: ranking}"], r"data\.sources\.x\.kind: 'ranking' is not one of"),
        ("model:\n  name_or_path: m\n", [], r"data\.paths is required"),
        (MINIMAL, ["engine=deepspeed"], r"needs deepspeed_config"),
        (MINIMAL, ["engine=deepspeed", f"deepspeed_config={ZERO2}", "model.final_dtype=float32"], r"needs model"),
        (MINIMAL, ["engine=deepspeed", "deepspeed_config=/nonexistent.json"], r"/nonexistent\.json does not exist"),
        (MINIMAL, ["data.last_batch=pad"], r"data\.last_batch: 'pad' is not one of"),
        (MINIMAL, ["data.source_draw=uniform"], r"data\.source_draw: 'uniform' is not one of"),
        (MINIMAL, ["data.max_rows_per_source=0"], r"data\.max_rows_per_source must be a positive number of rows"),
        (MINIMAL, ["data.max_rows_per_source=-80000"], r"data\.max_rows_per_source must be a positive number"),
        (MINIMAL, ["data.max_rows_per_source=1.5"], r"data\.max_rows_per_source: expected int, got 1\.5"),
        (MINIMAL, ["data.max_rows_per_source=true"], r"data\.max_rows_per_source: expected int, got True"),
        (MINIMAL, ["data.max_rows_per_source=80k"], r"data\.max_rows_per_source: expected int, got '80k'"),
        (MINIMAL, ["optim.warmup=per_gpu"], r"optim\.warmup: 'per_gpu' is not one of"),
        (MINIMAL, ["loss.in_batch_gradient=none"], r"loss\.in_batch_gradient: 'none' is not one of"),
        (MINIMAL, ["loss.temperature=0"], r"loss\.temperature must be > 0"),
        (MINIMAL, ["loss.matryoshka_dims=[64, 0]"], r"loss\.matryoshka_dims must be a non-empty list of positive"),
        (MINIMAL, ["loss.matryoshka_dims=[-8]"], r"loss\.matryoshka_dims must be a non-empty list of positive"),
        (MINIMAL, ["loss.matryoshka_dims=[]"], r"loss\.matryoshka_dims must be a non-empty list of positive"),
        (MINIMAL, ["loss.matryoshka_dims=[8.5]"], r"loss\.matryoshka_dims\[0\]: expected int, got 8\.5"),
        (MINIMAL, ["loss.matryoshka_dims=64"], r"loss\.matryoshka_dims: expected a list, got 64"),
        (MINIMAL, ["dist_timeout_minutes=0"], r"dist_timeout_minutes must be > 0"),
        (MINIMAL, ["grad_cache.chunk_tokens=0"], r"grad_cache\.chunk_tokens must be > 0"),
        (MINIMAL, ["model.gradient_checkpointing=sometimes"], r"model\.gradient_checkpointing: 'sometimes' matches"),
        (MINIMAL, ["model.activation_budget_gb=0"], r"model\.activation_budget_gb must be > 0"),
        (MINIMAL, ["temperature=0.05"], r"unknown key\(s\) \['temperature'\]"),
        (MINIMAL, ["model.lora={r: 0}"], r"model\.lora\.r must be > 0"),
        (MINIMAL, ["model.lora={r: 8.5}"], r"model\.lora\.r: expected int, got 8\.5"),
        (MINIMAL, ["model.lora={alpha: 0}"], r"model\.lora\.alpha must be > 0"),
        (MINIMAL, ["model.lora={dropout: 1.0}"], r"model\.lora\.dropout must be in \[0, 1\)"),
        (MINIMAL, ["model.lora={target_modules: []}"], r"model\.lora\.target_modules must name at least one"),
        (MINIMAL, ["model.lora={target_modules: [layers.0.q_proj]}"], r"model\.lora\.target_modules: .* not layer"),
        (MINIMAL, ["model.lora={target_modules: [q_proj, q_proj]}"], r"lists \['q_proj'\] more than once"),
        (MINIMAL, ["model.lora={rank: 8}"], r"model\.lora: unknown key\(s\) \['rank'\]"),
        (MINIMAL, ["optim.schedule=linear"], r"optim\.schedule: 'linear' is not one of"),
        (MINIMAL, ["save_extra={every: 0}"], r"save_extra\.every must be > 0"),
        (MINIMAL, ["save_extra={last: -1}"], r"save_extra\.last must be > 0"),
        (MINIMAL, ["save_extra={every: 500, last: 100}"], r"save_extra\.last \(100\) must be >= save_extra\.every"),
        (MINIMAL, ["save_extra=500"], r"save_extra: expected a mapping for SaveExtraConfig, got 500"),
        ("- a\n- b\n", [], r"top level must be a mapping"),
        (MINIMAL + "  batch_size: [1\n", [], r"not valid YAML"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(write(tmp_path, text), overrides)
    assert str(tmp_path / "c.yaml") in str(info.value)


def test_lora_schedule_and_extra_saves_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.model.lora is None and config.optim.schedule == "cosine" and config.save_extra is None
    config = load_config(write(tmp_path, MINIMAL), ["model.lora={}", "save_extra={}"])  # {}: on, with the defaults
    assert (config.model.lora.r, config.model.lora.alpha, config.model.lora.dropout) == (16, 32.0, 0.05)
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # Qwen3's linears
    assert config.model.lora.target_modules == projections
    assert (config.save_extra.every, config.save_extra.last) == (500, 2500)


@pytest.mark.parametrize("size", ["0.6b", "1.7b", "4b"])
def test_v2_configs_load(size: str) -> None:
    config = load_config(CONFIGS / f"f2llm-v2-{size}.yaml")
    hidden = {"0.6b": 1024, "1.7b": 2048, "4b": 2560}[size]
    assert config.loss.matryoshka_dims == [2**i for i in range(3, 15) if 2**i < hidden]
    assert config.data.num_negatives == {"retrieval": 7, "classification": 1, "clustering": 9}
    assert (config.save_extra.every, config.save_extra.last) == (500, 2500)
    assert config.optim.schedule == "cosine" and config.optim.warmup == "steps"
    # What the official v2 loop trains with: its preprocessing keeps 2047 tokens + EOS, its collate cuts to the
    # released config's max_seq_length, 1024; at most 80,000 rows per source; its source draw and short last batch.
    assert config.model.max_length == 1024 and config.data.max_rows_per_source == 80000
    assert (config.data.source_draw, config.data.last_batch) == ("fixed", "keep")


# ML-Embed's configs/config.json (3D-ML, Qwen3-0.6B), as shipped; f2llm's name for each setting.
ML_EMBED_CONFIG = {
    "train_batch_size": (8, lambda c: c.data.batch_size),
    "max_seq_length": (1024, lambda c: c.model.max_length),
    "learning_rate": (1e-5, lambda c: c.optim.lr),
    "min_lr": (1e-7, lambda c: c.optim.min_lr),
    "weight_decay": (0.01, lambda c: c.optim.weight_decay),
    "warmup_steps": (100, lambda c: c.optim.warmup_steps),
    "train_epochs": (2, lambda c: c.optim.epochs),
    "num_hard_neg": (7, lambda c: c.data.num_negatives["retrieval"]),
    "num_hard_neg_clustering": (9, lambda c: c.data.num_negatives["clustering"]),
    "scheduler_type": ("cosine", lambda c: c.optim.schedule),
    "checkpointing_steps": (5000, lambda c: c.save_every),
    "validation_steps": (5000, lambda c: c.validate_every),
    "use_mrl": (True, lambda c: c.loss.matryoshka_dims == [8, 16, 32, 64, 128, 256, 512]),  # its dims below 1024
    "use_mll": (True, lambda c: c.model.layer_exits == "ml-embed"),
    "r": (512, lambda c: c.model.embedding_rank),
    "use_mel": (False, lambda c: c.model.sample_embedding_rank),  # absent from its config: off
    # utils.inbatch_loss gathers the positives with accelerator.gather, which carries no gradient.
    "gather without autograd": ("queries_only", lambda c: c.loss.in_batch_gradient),
}


def test_ml_embed_config_reproduces_the_shipped_3d_ml_settings() -> None:
    config = load_config("ml-embed-0.6b")
    got = {key: read(config) for key, (_, read) in ML_EMBED_CONFIG.items()}
    assert got == {key: value for key, (value, _) in ML_EMBED_CONFIG.items()}
    # Its loop is v2's: warmup multiplied by the process count, the fixed source draw, short last batches kept.
    assert config.optim.warmup == "steps" and (config.data.source_draw, config.data.last_batch) == ("fixed", "keep")
    assert config.data.num_negatives["classification"] == 1 and (config.save_extra.every, config.save_extra.last) == (
        500,
        2500,
    )


def test_deepspeed_json_may_not_set_what_f2llm_owns(tmp_path: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5, "optimizer": {"type": "Adam"}}')
    with pytest.raises(ConfigError, match=r"sets \['gradient_clipping', 'optimizer'\], which f2llm fills"):
        load_config(write(tmp_path, MINIMAL), ["engine=deepspeed", f"deepspeed_config={ds}"])
    ds.write_text('{"zero_optimization": {"stage": 2, "compute_grad_norm": false}}')
    with pytest.raises(ConfigError, match=r"compute_grad_norm: false; f2llm needs the gradient norm"):
        load_config(write(tmp_path, MINIMAL), ["engine=deepspeed", f"deepspeed_config={ds}"])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    # A bare name that is neither a file nor shipped: the error lists what is shipped.
    with pytest.raises(ConfigError, match=r"f2llm-0\.6b-typo does not exist and is not a shipped config; shipped: "
                       r"demo-cpu, f2llm-0\.6b, f2llm-1\.7b, f2llm-4b, f2llm-v1-exact-4b, f2llm-v2-0\.6b"):  # fmt: skip
        load_config("f2llm-0.6b-typo")


SHIPPED = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
SET = ["model.name_or_path=m", "data.paths=[d]"]  # what the demo config leaves for f2llm.demo to fill


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_by_name(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--config f2llm-0.6b` from any folder gives the file of train/configs/, DeepSpeed JSON included."""
    monkeypatch.chdir(tmp_path)  # no checkout around: only the installed package can answer
    by_name, by_path = (
        load_config(name, SET),
        load_config(CONFIGS / f"{name}.yaml", SET),
    )
    assert by_name == by_path and load_config(f"{name}.yaml", SET) == by_name
    if by_name.engine == "deepspeed":
        assert Path(by_name.deepspeed_config).read_bytes() == (CONFIGS / "zero2.json").read_bytes()


@pytest.mark.parametrize("name", [n for n in SHIPPED if n.startswith("f2llm-")])
def test_recipe_configs_launch_the_fast_path(name: str) -> None:
    """What a user copies trains packed (no padding FLOPs; varlen attention on CUDA), checkpointing by budget."""
    config = load_config(name)
    assert config.data.packing and config.data.max_tokens >= config.model.max_length
    assert config.model.gradient_checkpointing == "auto"


def test_deepspeed_config_is_a_path_or_a_shipped_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "conf" / "zero2.json"  # a user's own JSON beside their YAML wins over the shipped one
    mine.parent.mkdir()
    mine.write_text('{"zero_optimization": {"stage": 1}}')
    yaml_file = mine.parent / "c.yaml"
    yaml_file.write_text(MINIMAL + "engine: deepspeed\ndeepspeed_config: zero2.json\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert Path(load_config(yaml_file).deepspeed_config) == mine.resolve()
    mine.unlink()  # then the shipped one, by name
    assert Path(load_config(yaml_file).deepspeed_config).read_bytes() == (CONFIGS / "zero2.json").read_bytes()
    assert Path(load_config(yaml_file, ["deepspeed_config=zero3"]).deepspeed_config).name == "zero3.json"
    with pytest.raises(ConfigError, match=r"deepspeed_config: zero9\.json does not exist \(nor in .*conf\) and is not "
                       r"a shipped config; shipped: zero0\.json, zero1\.json, zero2\.json, zero3\.json"):  # fmt: skip
        load_config(yaml_file, ["deepspeed_config=zero9.json"])


def test_checkpoints_are_atomic_and_pruned(tmp_path: Path) -> None:
    writer = CheckpointWriter(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        writer.save(step, lambda d, s=step: save_state({"step": s, "w": torch.full((3,), float(s))}, d / "state.pt"))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000020", "step-00000030"]
    assert load_state(latest_checkpoint(tmp_path) / "state.pt")["step"] == 30

    def dies_half_way(folder: Path) -> None:
        (folder / "state.pt").write_bytes(b"partial")
        raise KeyboardInterrupt  # the job is killed mid-write

    with pytest.raises(KeyboardInterrupt):
        writer.save(40, dies_half_way)
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step-00000030" and load_state(latest / "state.pt")["step"] == 30
    assert not list(tmp_path.glob(".tmp-*"))


def test_stale_temporary_folder_is_ignored_then_removed(tmp_path: Path) -> None:
    writer = CheckpointWriter(tmp_path, keep_last=3)
    writer.save(1, lambda d: save_state({"step": 1}, d / "state.pt"))
    stale = tmp_path / ".tmp-step-00000002"  # what a kill -9 during a save leaves behind
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"\x80garbage")
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    writer.save(3, lambda d: save_state({"step": 3}, d / "state.pt"))
    assert not stale.exists() and latest_checkpoint(tmp_path).name == "step-00000003"


def test_rng_state_round_trip() -> None:
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    state = rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand(4)  # move every generator on
    set_rng_state(state)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and got[2] == expected[2]


def test_rng_state_survives_weights_only_load(tmp_path: Path) -> None:
    save_state(rng_state(), tmp_path / "rng.pt")
    set_rng_state(load_state(tmp_path / "rng.pt"))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    torch.save({"state": Exploit()}, tmp_path / "state.pt")
    with pytest.raises(RuntimeError, match="refusing to load"):
        load_state(tmp_path / "state.pt")
    assert not (tmp_path / "pwned").exists()
