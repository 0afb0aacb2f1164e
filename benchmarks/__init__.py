"""Benchmarks of dist-pgkm, shipped as ``dist_pgkm.bench`` and run by ``dist-pgkm bench ...``.

:mod:`dist_pgkm.bench.common` holds what every benchmark shares (machine description, commit,
JSON output, markdown tables and marker sections, targets); each benchmark is one module
(:mod:`dist_pgkm.bench.kmeans`). Benchmarks are CLI-side code: they may render with rich.
"""
