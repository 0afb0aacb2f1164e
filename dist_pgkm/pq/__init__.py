"""Product quantization of weights: the sub-vector layout, packed codes, PQ modules."""

from dist_pgkm.pq.codec import from_subvectors, to_subvectors
from dist_pgkm.pq.modules import PQ_MODULES, PQConv2d, PQEmbedding, PQLinear, PQModule
from dist_pgkm.pq.pack import bits_for, pack_codes, unpack_codes
from dist_pgkm.pq.quantize import QuantizedWeight, bits_per_weight, quantize_weight

__all__ = [
    "PQ_MODULES",
    "PQConv2d",
    "PQEmbedding",
    "PQLinear",
    "PQModule",
    "QuantizedWeight",
    "bits_for",
    "bits_per_weight",
    "from_subvectors",
    "pack_codes",
    "quantize_weight",
    "to_subvectors",
    "unpack_codes",
]
