"""ZeRO-3 on two ranks, run by ``test_engine.py::test_zero3_two_ranks`` under torchrun.

Usage: ``torchrun --nproc_per_node=2 -m tests.finetune._zero3_worker CKPT_DIR RESULT_JSON``.
Rank 0 writes what it measured as JSON; the test asserts on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from dist_pgkm.finetune import engine as E
from dist_pgkm.noise import apply_noise_mask, noise_mask
from dist_pgkm.pq import to_subvectors
from tests.finetune._models import BS, groups, options, tiny_llama, train_steps


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [n for n in a if not torch.equal(a[n], b[n])]


def main(ckpt: Path, out: Path) -> None:
    torch.set_num_threads(1)
    rank, world = E.init_distributed()
    result: dict[str, Any] = {"world_size": world}

    # 1. lr 0: Quant-Noise under ZeRO-3 never changes the (partitioned) parameters.
    model, noise = tiny_llama(noise_p=0.5)
    ds, train = options(3, max_grad_norm=0)
    frozen = [{**g, "lr": 0.0, "weight_decay": 0.0} for g in groups(model, 1e-2, 1e-2)]
    engine = E.build_engine(model, frozen, ds, train)
    weights = [h.module.weight for h in noise]
    result["partitioned"] = all(0 < w.ds_tensor.numel() < w.ds_numel for w in weights)
    calls, dropped, mismatches = 0, 0, 0
    for handle in noise:
        plain = handle.noised_weight

        def checked(handle: Any = handle, plain: Any = plain) -> torch.Tensor:
            # The weight the forward sees is the gathered, full one; the mask drawn from the
            # layer's generator zeroes exactly whole to_subvectors blocks.
            nonlocal calls, dropped, mismatches
            weight = handle.module.weight.detach().clone()
            state = handle.generator.get_state()
            noised = plain()
            n_blocks = to_subvectors(weight, BS).shape[0]
            mask = noise_mask(n_blocks, handle.p, torch.Generator().set_state(state))
            zero = (to_subvectors(noised.detach(), BS) == 0).all(1)
            expected = apply_noise_mask(weight, mask, handle.p, BS)
            full = (handle.module.out_features, handle.module.in_features)
            same = torch.equal(zero, mask) and torch.equal(noised, expected)
            mismatches += int(not (noised.shape == weight.shape == full and same))
            calls, dropped = calls + 1, dropped + int(mask.sum())
            return noised

        handle.noised_weight = checked  # type: ignore[method-assign]
    start = E.gathered_parameters(engine)
    train_steps(engine, 0, 3, rank)
    result["lr0_changed"] = _changed(start, E.gathered_parameters(engine))
    result.update(noise_calls=calls, dropped_blocks=dropped, mask_mismatches=mismatches)
    import deepspeed.comm.comm as ds_comm

    result["no_shm_op"] = ds_comm.cdb.shm_comm_op is None
    E.close(engine)

    # 2. lr > 0: the same run moves the parameters (the check above can fail).
    engine = E.build_engine(model, groups(model, 1e-2, 1e-2), ds, train)
    train_steps(engine, 0, 2, rank)
    result["lr_changed"] = _changed(start, E.gathered_parameters(engine))
    E.close(engine)

    # 3. Checkpoint round trip: train 2, save, train 2 -> P1; fresh engine, load, train 2 -> P2.
    ds, train = options(3, warmup_steps=10)
    model, noise = tiny_llama()
    engine = E.build_engine(model, groups(model, 1e-2, 1e-1), ds, train)
    train_steps(engine, 0, 2, rank)
    E.save_checkpoint(engine, ckpt, "step2", {"step": 2, "noise": noise.state_dict()})
    train_steps(engine, 2, 2, rank)
    p1 = E.gathered_parameters(engine)
    E.close(engine)
    model, noise = tiny_llama()
    engine = E.build_engine(model, groups(model, 1e-2, 1e-1), ds, train)
    loaded = E.load_checkpoint(engine, ckpt)
    assert loaded is not None
    assert loaded[0] == "step2"
    noise.load_state_dict(loaded[1]["noise"])
    train_steps(engine, 2, 2, rank)
    result["round_trip_changed"] = _changed(p1, E.gathered_parameters(engine))
    E.close(engine)

    if rank == 0:
        out.write_text(json.dumps(result))
    E.shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
