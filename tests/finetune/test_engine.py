"""The DeepSpeed engine wrapper with real engines (gloo, CPU): no mocks.

Tolerances: none. Everything compared here is bit-exact on CPU (fixed seeds, fixed token ids,
one thread), so every comparison is ``torch.equal``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_pgkm.config.finetune import DeepSpeedOptions, TrainOptions
from dist_pgkm.errors import CheckpointError, ConfigError, InvalidInputError
from dist_pgkm.finetune import engine as E
from dist_pgkm.pq import PQModule, to_subvectors
from tests.finetune._models import BS, groups, options, tiny_llama, train_steps

ROOT = Path(__file__).resolve().parents[2]


def _codes(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        n: (m.codes.clone(), m.index.clone())
        for n, m in model.named_modules()
        if isinstance(m, PQModule)
    }


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [n for n in a if not torch.equal(a[n], b[n])]


# --- the config translation and hardware checks (no engine) --------------------------------


def test_deepspeed_config_translation() -> None:
    ds = DeepSpeedOptions(zero_stage=2, dtype="bf16")
    train = TrainOptions(batch_size=8, micro_batch_size=2, max_grad_norm=0.5)
    config = E.deepspeed_config(ds, train, world_size=3)
    assert config["train_batch_size"] == 24
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 4
    assert config["zero_optimization"] == {"stage": 2}
    assert config["bf16"] == {"enabled": True}
    assert config["gradient_clipping"] == 0.5
    assert config["wall_clock_breakdown"] is False
    assert config["steps_per_print"] >= 10**9
    # No DeepSpeed optimizer or scheduler: those would JIT-build cpu_adam / fused_adam.
    assert not {"optimizer", "scheduler", "fp16"} & config.keys()
    json.dumps(config)
    plain = E.deepspeed_config(DeepSpeedOptions(), TrainOptions(max_grad_norm=0), world_size=1)
    assert "gradient_clipping" not in plain
    assert not {"bf16", "fp16"} & plain.keys()
    fp16 = E.deepspeed_config(DeepSpeedOptions(dtype="fp16"), TrainOptions(), world_size=1)
    assert fp16["fp16"]["enabled"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
def test_check_hardware_on_cpu() -> None:
    with pytest.raises(ConfigError, match=r"fp16 needs a CUDA GPU.*Use dtype: bf16"):
        E.check_hardware(DeepSpeedOptions(dtype="fp16"))
    with pytest.raises(ConfigError, match="world_size must be at least 1"):
        E.check_hardware(DeepSpeedOptions(), world_size=0)
    # Measured to run on CPU: every ZeRO stage with fp32 and bf16, one rank or two.
    for stage in (0, 1, 2, 3):
        for dtype in ("fp32", "bf16"):
            for world in (1, 2):
                E.check_hardware(DeepSpeedOptions(zero_stage=stage, dtype=dtype), world)


def test_fp16_refused_before_anything_is_built(process_group: tuple[int, int]) -> None:
    if torch.cuda.is_available():
        pytest.skip("fp16 runs on a GPU")
    model, _ = tiny_llama()
    ds, train = options(0, "fp16")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        E.build_engine(model, groups(model, 1e-2, 1e-2), ds, train)


def test_param_group_errors(process_group: tuple[int, int]) -> None:
    model, _ = tiny_llama()
    ds, train = options(0)
    some = list(model.parameters())[:2]
    with pytest.raises(InvalidInputError, match="require gradients but are in no param group"):
        E.build_engine(model, [{"params": some}], ds, train)
    with pytest.raises(InvalidInputError, match="not a parameter of the LlamaForCausalLM"):
        E.build_engine(model, [{"params": [torch.nn.Parameter(torch.ones(3))]}], ds, train)
    model.requires_grad_(False)
    with pytest.raises(InvalidInputError, match="no trainable parameter"):
        E.build_engine(model, [{"params": list(model.parameters())}], ds, train)


# --- engines ----------------------------------------------------------------------------------


def test_no_deepspeed_op_is_compiled(process_group: tuple[int, int]) -> None:
    import deepspeed.comm.comm as ds_comm
    from deepspeed.ops.op_builder.builder import OpBuilder

    model, _ = tiny_llama()
    ds, train = options(2)
    start = time.perf_counter()
    engine = E.build_engine(model, groups(model, 1e-2, 1e-2), ds, train)
    train_steps(engine, 0, 1)
    elapsed = time.perf_counter() - start
    E.close(engine)
    assert process_group == (0, 1)
    assert ds_comm.cdb.shm_comm_op is None  # gloo collectives, no deepspeed_shm_comm
    assert not getattr(OpBuilder, "_loaded_ops", {})  # no C++ op loaded or JIT-built
    assert elapsed < 30, f"engine build + 1 step took {elapsed:.0f} s: an op was compiled?"


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_quant_noise_never_changes_stored_parameters(
    process_group: tuple[int, int], stage: int
) -> None:
    """lr 0 (and no weight decay): many noised forwards, backwards and optimizer steps leave
    every parameter bit-identical; lr > 0 changes them (the check can fail)."""
    model, noise = tiny_llama(noise_p=0.5)
    ds, train = options(stage, max_grad_norm=0)
    frozen = [{**g, "lr": 0.0, "weight_decay": 0.0} for g in groups(model, 1e-2, 1e-2)]
    engine = E.build_engine(model, frozen, ds, train)
    start = E.gathered_parameters(engine)
    noised: list[int] = []
    handle = noise[noise.names[0]]
    plain = handle.noised_weight

    def counting() -> torch.Tensor:
        w = plain()
        noised.append(int((to_subvectors(w.detach(), BS) == 0).all(1).sum()))
        return w

    handle.noised_weight = counting  # type: ignore[method-assign]
    train_steps(engine, 0, 6)
    assert len(noised) == 6  # the noise ran ...
    assert min(noised) > 0  # ... and dropped blocks every time
    assert _changed(start, E.gathered_parameters(engine)) == []
    E.close(engine)
    assert _changed(start, dict(model.named_parameters())) == []

    engine = E.build_engine(model, groups(model, 1e-2, 1e-2), ds, train)
    train_steps(engine, 0, 2)
    moved = _changed(start, E.gathered_parameters(engine))
    E.close(engine)
    assert any("layers.1.mlp" in n for n in moved)
    assert any("centroids" in n for n in moved)


@pytest.mark.parametrize("stage", [0, 2])
def test_centroids_train_codes_stay(process_group: tuple[int, int], stage: int) -> None:
    model, _ = tiny_llama()
    codes = _codes(model)
    embed, head = model.model.embed_tokens, model.lm_head
    assert head.centroids is embed.centroids
    ds, train = options(stage)
    engine = E.build_engine(model, groups(model, 1e-2, 1e-1), ds, train)
    start = E.gathered_parameters(engine)
    train_steps(engine, 0, 3)
    after = E.gathered_parameters(engine)
    moved = _changed(start, after)
    assert {"model.embed_tokens.centroids", "model.layers.0.mlp.gate_proj.centroids"} <= set(moved)
    assert not any("lm_head" in n for n in after)  # the tied codebook is one parameter
    for name, (c, i) in _codes(model).items():
        assert torch.equal(c, codes[name][0]), name
        assert torch.equal(i, codes[name][1]), name
    E.close(engine)
    assert model.lm_head.centroids is model.model.embed_tokens.centroids  # still tied
    assert torch.equal(model.lm_head.centroids, after["model.embed_tokens.centroids"])


def _round_trip(stage: int, tmp_path: Path) -> None:
    n, m = 3, 3
    ds, train = options(stage, warmup_steps=10)  # the LR still ramps: the scheduler must resume

    model, noise = tiny_llama()
    engine = E.build_engine(model, groups(model, 1e-2, 1e-1), ds, train)
    train_steps(engine, 0, n)
    E.save_checkpoint(engine, tmp_path, f"step{n}", {"step": n, "noise": noise.state_dict()})
    train_steps(engine, n, m)
    p1 = E.gathered_parameters(engine)
    E.close(engine)

    model, noise = tiny_llama()  # fresh model, same init; generators restarted
    engine = E.build_engine(model, groups(model, 1e-2, 1e-1), ds, train)
    loaded = E.load_checkpoint(engine, tmp_path)
    assert loaded is not None
    tag, state = loaded
    assert tag == f"step{n}"
    assert state["step"] == n
    noise.load_state_dict(state["noise"])
    train_steps(engine, state["step"], m)
    p2 = E.gathered_parameters(engine)
    E.close(engine)
    assert _changed(p1, p2) == []


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_checkpoint_round_trip_is_bit_exact(
    process_group: tuple[int, int], stage: int, tmp_path: Path
) -> None:
    _round_trip(stage, tmp_path)


def test_round_trip_detects_a_missing_noise_state(
    process_group: tuple[int, int], tmp_path: Path
) -> None:
    """The comparison above can fail: resuming without the Quant-Noise generators diverges."""
    ds, train = options(0)
    model, _ = tiny_llama()
    engine = E.build_engine(model, groups(model, 1e-2, 1e-1), ds, train)
    train_steps(engine, 0, 2)
    E.save_checkpoint(engine, tmp_path, "a", {})
    train_steps(engine, 2, 2)
    p1 = E.gathered_parameters(engine)
    E.close(engine)
    model, _ = tiny_llama()
    engine = E.build_engine(model, groups(model, 1e-2, 1e-1), ds, train)
    assert E.load_checkpoint(engine, tmp_path) == ("a", {})
    train_steps(engine, 2, 2)
    assert _changed(p1, E.gathered_parameters(engine))
    E.close(engine)


def test_partial_checkpoints_are_never_loaded(
    process_group: tuple[int, int], tmp_path: Path
) -> None:
    ds, train = options(2)
    model, _ = tiny_llama()
    engine = E.build_engine(model, groups(model, 1e-2, 1e-1), ds, train)
    assert E.load_checkpoint(engine, tmp_path) is None
    train_steps(engine, 0, 1)
    E.save_checkpoint(engine, tmp_path, "s1", {"step": 1})
    train_steps(engine, 1, 1)
    # A crash after DeepSpeed wrote "s2" but before the marker recorded it:
    engine.save_checkpoint(str(tmp_path), tag="s2", client_state={"dist_pgkm": {"step": 2}})
    assert (tmp_path / "latest").read_text() == "s2"  # DeepSpeed's pointer says s2 ...
    assert E.latest_checkpoint(tmp_path) == "s1"  # ... ours does not
    assert E.load_checkpoint(engine, tmp_path) == ("s1", {"step": 1})
    # A crash in the middle of DeepSpeed's save: a truncated file under an unrecorded tag.
    (tmp_path / "s3").mkdir()
    (tmp_path / "s3" / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x02trunc")
    assert E.load_checkpoint(engine, tmp_path) == ("s1", {"step": 1})

    # Saving prunes beyond keep_checkpoints (2) and clears the leftovers of crashed saves.
    for step in (2, 3, 4):
        E.save_checkpoint(engine, tmp_path, f"s{step}", {"step": step})
    marker = json.loads((tmp_path / E.MARKER).read_text())
    assert marker["complete"] == ["s3", "s4"]
    assert marker["latest"] == "s4"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["s3", "s4"]
    assert (tmp_path / "latest").read_text() == "s4"  # rewritten after our marker
    assert E.load_checkpoint(engine, tmp_path) == ("s4", {"step": 4})
    assert E.load_checkpoint(engine, tmp_path, prefix="s3") == ("s3", {"step": 3})
    assert E.load_checkpoint(engine, tmp_path, prefix="stage1-") is None  # another stage's

    shutil.rmtree(tmp_path / "s4")
    with pytest.raises(CheckpointError, match=r"names checkpoint 's4' but .* is missing"):
        E.load_checkpoint(engine, tmp_path)
    (tmp_path / E.MARKER).write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be read"):
        E.load_checkpoint(engine, tmp_path)
    (tmp_path / E.MARKER).unlink()
    assert E.load_checkpoint(engine, tmp_path) is None
    with pytest.raises(InvalidInputError, match="plain directory name"):
        E.save_checkpoint(engine, tmp_path, "../escape", {})
    E.close(engine)


def test_close_gives_back_plain_fp32_parameters_under_bf16_zero3(
    process_group: tuple[int, int],
) -> None:
    """bf16 casts the model in place and ZeRO-3 partitions it; close() undoes both, and a new
    engine with another trainable set (the next stage) trains on the same model."""
    model, _ = tiny_llama()
    ds, train = options(3, "bf16")
    engine = E.build_engine(model, groups(model, 1e-2, 1e-1), ds, train)
    assert next(model.parameters()).dtype == torch.bfloat16
    train_steps(engine, 0, 2)
    master = E.gathered_parameters(engine)
    E.close(engine)
    with pytest.raises(InvalidInputError, match="closed"):
        E.save_checkpoint(engine, Path("unused"), "t", {})
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        assert not hasattr(p, "ds_id"), name
        assert torch.equal(p.detach(), master[name]), name
    assert model.lm_head.centroids is model.model.embed_tokens.centroids
    assert all(b.dtype != torch.bfloat16 for b in model.buffers())
    assert all(type(m._parameters) is dict for m in model.modules())  # no ZeRO-3 wrappers left

    model.model.layers[1].requires_grad_(False)  # next stage: another trainable set
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine = E.build_engine(model, [{"params": trainable}], *options(3))
    before = E.gathered_parameters(engine)  # frozen ZeRO-3 parameters are gathered too
    train_steps(engine, 2, 2)
    moved = _changed(before, E.gathered_parameters(engine))
    E.close(engine)
    assert moved
    assert not any("layers.1." in n for n in moved)
    assert _changed(before, {n: p.detach() for n, p in model.named_parameters()}) == moved


# --- ZeRO-3 with two ranks ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_zero3_two_ranks(tmp_path: Path) -> None:
    """torchrun --nproc_per_node=2: Quant-Noise keeps parameters under ZeRO-3 partitioning, its
    mask follows the iPQ block layout of the gathered weight, and a checkpoint round trip is
    bit-exact (see _zero3_worker.py)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {k: v for k, v in os.environ.items() if k not in E._LAUNCHER_ENV}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            "-m",
            "tests.finetune._zero3_worker",
            str(tmp_path / "ckpt"),
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(out.read_text())
    assert result["world_size"] == 2
    assert result["partitioned"]  # each rank holds only a shard of the noised weights
    assert result["noise_calls"] >= 6
    assert result["dropped_blocks"] > 0
    assert result["mask_mismatches"] == 0
    assert result["lr0_changed"] == []
    assert result["lr_changed"]
    assert result["round_trip_changed"] == []
    assert result["no_shm_op"]


def test_importing_the_engine_does_not_import_deepspeed() -> None:
    code = (
        "import sys, dist_pgkm.finetune, dist_pgkm.finetune.engine; "
        "print('deepspeed' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "False"


class _Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("stage", [0, 2])
def test_resume_never_unpickles_code_from_the_directory(
    process_group: tuple[int, int], stage: int, tmp_path: Path
) -> None:
    """Issue 18 item 4: DeepSpeed's own load (``torch.load(weights_only=False)``) would run it."""
    ds, train = options(stage)
    model, _ = tiny_llama()
    engine = E.build_engine(model, groups(model, 1e-2, 1e-1), ds, train)
    E.save_checkpoint(engine, tmp_path / "ckpt", "a", {"step": 0})
    E.close(engine)
    marker = tmp_path / "pwned"
    for path in sorted((tmp_path / "ckpt" / "a").iterdir()):
        state = torch.load(path, weights_only=False)  # our own file, written above
        state["extra"] = _Payload(marker)
        torch.save(state, path)
    # The old failure: loading as DeepSpeed does runs the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    model, _ = tiny_llama()
    engine = E.build_engine(model, groups(model, 1e-2, 1e-1), ds, train)
    with pytest.raises(CheckpointError, match=r"holds Python objects .* never unpickles"):
        E.load_checkpoint(engine, tmp_path / "ckpt")
    assert not marker.exists()
    E.close(engine)
