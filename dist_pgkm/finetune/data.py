"""Training sequences for fine-tuning, never overlapping the evaluation text.

The corpus is tokenized once and cut as :func:`dist_pgkm.eval.text.windows_from_ids` cuts it
for evaluation: consecutive windows of ``eval_window`` tokens, the even ones held out for
evaluation. Training uses only the odd ("calib") windows, each cut into sequences of
``seq_len`` tokens, so a model is never trained on a token it is evaluated on.

A sentence encoder (``objective: embedding-distill``) trains on sentences instead: the caller
tokenizes them, padded to ``seq_len`` tokens, and chooses them away from the evaluation
(:func:`dist_pgkm.eval.retrieval.training_texts`); :func:`padded_sentences` checks the tensor.

A batch is a pure function of (seed, stage, step): a run resumed at step ``n`` draws exactly
the batches an uninterrupted run would have drawn from step ``n`` on.
"""

from __future__ import annotations

import torch

from dist_pgkm.errors import DataError
from dist_pgkm.utils.seeding import derive_seed

__all__ = ["Batches", "padded_sentences", "training_sequences"]


def training_sequences(ids: torch.Tensor, seq_len: int, eval_window: int = 512) -> torch.Tensor:
    """All training sequences of a token stream: ``(n, seq_len)`` int64.

    Args:
        ids: 1-D token ids of the whole corpus.
        seq_len: Tokens per training sequence (at most ``eval_window``).
        eval_window: Window length of the evaluation split (its windows are excluded).

    Raises:
        DataError: ``seq_len`` exceeds ``eval_window``, or the text has no training window.
    """
    if seq_len > eval_window:
        raise DataError(
            f"seq_len {seq_len} is longer than the evaluation windows ({eval_window} tokens), "
            "from which training sequences are cut. Use seq_len <= "
            f"{eval_window}."
        )
    n_windows = ids.numel() // eval_window
    windows = ids[: n_windows * eval_window].reshape(n_windows, eval_window)[1::2]  # calib
    per_window = eval_window // seq_len
    if windows.shape[0] == 0:
        raise DataError(
            f"The text has {ids.numel()} tokens: fewer than two windows of {eval_window}, so "
            "nothing is left for training once the evaluation windows are held out. Pass a "
            "longer text."
        )
    seqs = windows[:, : per_window * seq_len].reshape(-1, seq_len)
    return seqs.to(torch.int64).contiguous()


def padded_sentences(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Training sentences of a sentence encoder, checked: ``(n, seq_len)`` int64.

    Args:
        ids: Token ids, one sentence per row, padded (or truncated) to ``seq_len`` with the
            model's ``pad_token_id`` (as a Hugging Face tokenizer does with
            ``padding="max_length", truncation=True, max_length=seq_len``).
        seq_len: ``train.seq_len``.

    Raises:
        DataError: ``ids`` is not a 2-D tensor of ``seq_len`` columns with at least one row.
    """
    if ids.dim() != 2 or ids.shape[1] != seq_len or ids.shape[0] == 0:
        raise DataError(
            f"objective embedding-distill trains on sentences as a (n, {seq_len}) tensor of "
            f"token ids padded to train.seq_len; got shape {tuple(ids.shape)}. Tokenize the "
            f"sentences with padding='max_length', truncation=True, max_length={seq_len}."
        )
    return ids.to(torch.int64).contiguous()


class Batches:
    """Deterministic batches of training sequences, drawn by (stage, step).

    Args:
        sequences: ``(n, seq_len)`` training sequences.
        batch_size: Sequences per step.
        seed: Run seed.

    Raises:
        DataError: Fewer sequences than one batch needs.
    """

    def __init__(self, sequences: torch.Tensor, batch_size: int, seed: int) -> None:
        n, seq_len = sequences.shape
        if n < batch_size:
            raise DataError(
                f"The training text gives {n} sequences of {seq_len} tokens, and one batch "
                f"needs {batch_size}. Pass a longer text (train.text), or lower "
                "train.batch_size or train.seq_len."
            )
        self.sequences = sequences
        self.batch_size = batch_size
        self.seed = seed

    @property
    def seq_len(self) -> int:
        return int(self.sequences.shape[1])

    def get(self, stage: int, step: int) -> torch.Tensor:
        """The batch of ``step`` in ``stage``: ``(batch_size, seq_len)``, distinct sequences."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, f"batch:{stage}:{step}"))
        picks = torch.randperm(self.sequences.shape[0], generator=g)[: self.batch_size]
        return self.sequences[picks]
