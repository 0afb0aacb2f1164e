"""Bad input gives a typed error that says what, why and how to fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dist_pgkm
from dist_pgkm.errors import ConfigError, DistPGKMError, InvalidInputError

X = torch.randn(300, 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"x": torch.randn(10, 4), "k": 16}, r"k=16 centroids from only n=10 points.*k <= 10"),
        ({"x": X, "k": 1}, r"k=1 centroids cannot quantize.*k >= 2"),
        ({"x": X, "k": 2.5}, r"k must be an integer"),
        ({"x": torch.randn(300), "k": 4}, r"shape \(n, d\).*1-D.*reshape"),
        ({"x": torch.randn(3, 100, 4), "k": 4}, r"3-D shape"),
        ({"x": torch.empty(0, 4), "k": 4}, r"empty"),
        ({"x": torch.randint(0, 9, (300, 4)), "k": 4}, r"dtype torch.int64.*\.float\(\)"),
        ({"x": X, "k": 4, "weights": -torch.ones(300)}, r"finite and >= 0"),
        ({"x": X, "k": 4, "weights": torch.ones(299)}, r"shape \(300,\)"),
        ({"x": X, "k": 4, "weights": torch.zeros(300)}, r"sum to 0"),
        ({"x": X, "k": 4, "n_iter": 0}, r"n_iter must be an integer >= 1"),
        ({"x": X, "k": 4, "backend": "cuda"}, r"unknown backend 'cuda'"),
        ({"x": "not a tensor", "k": 4}, r"2-D float tensor|shape \(n, d\)"),
    ],
)
def test_bad_input_is_a_typed_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        dist_pgkm.cluster(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_name_the_row(bad: float) -> None:
    x = torch.randn(300, 4)
    x[123, 2] = bad
    with pytest.raises(InvalidInputError, match=r"NaN or Inf in 1 of 300 rows \(first: row 123\)"):
        dist_pgkm.cluster(x, 8)


def test_unknown_method_and_option_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown method 'pq'.*'fairseq-em'"):
        dist_pgkm.cluster(X, 4, method="pq")
    with pytest.raises(ConfigError, match=r"method 'pgkm'.*consolidate.*split_by"):
        dist_pgkm.cluster(X, 4, consolidat=False)
    with pytest.raises(ConfigError, match=r"method 'fairseq-em'"):
        dist_pgkm.cluster(X, 4, method="fairseq-em", eps=-1.0)
    with pytest.raises(ConfigError, match=r"Options it accepts: \(none\)"):
        dist_pgkm.cluster(X, 4, method="kmeans++", radius=0.1)


def test_errors_share_one_base_and_stay_value_errors() -> None:
    with pytest.raises(DistPGKMError):
        dist_pgkm.cluster(X, 1)
    with pytest.raises(ValueError, match="k=1"):
        dist_pgkm.cluster(X, 1)


def test_numpy_input_is_accepted() -> None:
    x = np.random.default_rng(0).standard_normal((500, 4)).astype(np.float32)
    result = dist_pgkm.cluster(x, 8, backend="torch")
    assert result.codes.shape == (500,)
    assert result.centroids.shape == (8, 4)
