"""The Ray options, defined once: :func:`add_ray_options` adds them to a command's parser,
:func:`ray_options` reads them back as the keyword arguments the library takes.

``quantize`` takes all of them; ``finetune`` takes ``--workers`` and ``--address`` for its
quantize phases (its Ray Train ranks have their own options).
"""

from __future__ import annotations

import argparse
from typing import TypedDict

from dist_pgkm.cli._common import non_negative_int, positive_int

__all__ = ["ADDRESS_HELP", "WORKERS_HELP", "RayArgs", "add_ray_options", "ray_options"]

WORKERS_HELP = (
    "Ray workers: N on an embedded Ray on this machine (or on --address); "
    "0 (default) runs in this process, or one per slot of the --address cluster"
)
ADDRESS_HELP = (
    "join the Ray cluster whose head is at HOST:PORT, or 'auto' for $RAY_ADDRESS "
    "(inside `ray job submit`; see docs/distributed.md)"
)


class _Where(TypedDict):
    workers: int
    address: str | None


class RayArgs(_Where, total=False):
    """The Ray options of a command, as keyword arguments of ``quantize_model`` (every key)
    and ``finetune_model`` (``workers`` and ``address``)."""

    gpus_per_worker: float
    cpus_per_worker: int
    min_workers: int
    min_workers_timeout: float


def add_ray_options(
    p: argparse.ArgumentParser,
    *,
    placement: bool = True,
    workers_help: str = WORKERS_HELP,
    address_help: str = ADDRESS_HELP,
) -> None:
    """Add ``--workers`` and ``--address`` to ``p``, and with ``placement`` the options that
    size and place the workers (``--gpus-per-worker``, ``--cpus-per-worker``,
    ``--min-workers``, ``--min-workers-timeout``).

    ``workers_help`` and ``address_help`` say what the workers run for a command whose
    workers are not its main work (``finetune``).
    """
    p.add_argument("--workers", type=non_negative_int, default=0, metavar="N", help=workers_help)
    p.add_argument("--address", default=None, metavar="HOST:PORT", help=address_help)
    if not placement:
        return
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        metavar="F",
        help="GPUs each Ray worker reserves (default 0: CPU workers)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=positive_int,
        default=1,
        metavar="N",
        help="CPUs each CPU Ray worker reserves and uses as threads (default 1)",
    )
    p.add_argument(
        "--min-workers",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="with --address: wait until the cluster has slots for N workers before starting "
        "(nodes that join later get workers too)",
    )
    p.add_argument(
        "--min-workers-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long --min-workers waits before failing (default 600)",
    )


def ray_options(args: argparse.Namespace) -> RayArgs:
    """The Ray options :func:`add_ray_options` added to the command that parsed ``args``."""
    if not hasattr(args, "min_workers_timeout"):  # added with placement=False
        return RayArgs(workers=args.workers, address=args.address)
    return RayArgs(
        workers=args.workers,
        address=args.address,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        min_workers=args.min_workers,
        min_workers_timeout=args.min_workers_timeout,
    )
