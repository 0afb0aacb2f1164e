"""Training sequences never share a token with the evaluation windows; batches are replayable."""

from __future__ import annotations

import pytest
import torch

from dist_pgkm.errors import DataError
from dist_pgkm.eval.text import windows_from_ids
from dist_pgkm.finetune.data import Batches, training_sequences


def test_training_never_sees_an_evaluation_token() -> None:
    ids = torch.arange(100_003)  # token i *is* position i: overlaps become visible
    train = training_sequences(ids, seq_len=200)
    evaluated = windows_from_ids(ids, window=512, n_tokens=512 * 97, split="eval")
    assert train.shape == (97 * 2, 200)  # 195 windows of 512 -> 97 calib windows -> 2 x 200 each
    assert set(train.flatten().tolist()).isdisjoint(evaluated.flatten().tolist())
    # each training sequence is contiguous text
    assert bool((train[:, 1:] - train[:, :-1] == 1).all())


def test_batches_are_a_function_of_stage_and_step() -> None:
    seqs = torch.arange(64 * 8).reshape(64, 8)
    a, b = Batches(seqs, 4, seed=1), Batches(seqs.clone(), 4, seed=1)
    assert torch.equal(a.get(2, 17), b.get(2, 17))
    assert not torch.equal(a.get(2, 17), a.get(2, 18))
    assert not torch.equal(a.get(1, 17), a.get(2, 17))
    assert not torch.equal(a.get(2, 17), Batches(seqs, 4, seed=2).get(2, 17))
    batch = a.get(0, 0)
    assert len({int(row[0]) for row in batch}) == 4  # distinct sequences


def test_text_too_short_names_the_fix() -> None:
    with pytest.raises(DataError, match="gives 2 sequences of 8 tokens, and one batch needs 4"):
        Batches(torch.zeros(2, 8, dtype=torch.int64), 4, seed=0)
    with pytest.raises(DataError, match="fewer than two windows of 512"):
        training_sequences(torch.arange(900), 128)
    with pytest.raises(DataError, match="Use seq_len <= 512"):
        training_sequences(torch.arange(5000), 1024)
