"""A timing worker for interleaved comparisons: times TokenFlow encode/decode calls on request.

Reads one JSON request per stdin line, ``{"variant": "b256e", "op": "encode", "batch": 1, "repeats": 1}``,
and answers one JSON line on stdout, ``{"variant": ..., "op": ..., "batch": ..., "runs": [seconds, ...]}``
(logs go to stderr). The first request for a (variant, op, batch) also compiles and makes one untimed
warm-up call. A driver can run this beside a worker for another implementation with the same protocol and
alternate calls between them, so that both see the same machine load (the project's machines are shared).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bench import common, models, worker_protocol  # noqa: E402


class Worker:
    """Caches built variants and compiled calls across requests."""

    def __init__(self) -> None:
        self.built: dict[str, models.Built] = {}
        self.ready: dict[tuple[str, str, int], tuple[Any, tuple]] = {}

    def prepare(self, variant: str, op: str, batch: int) -> tuple[Any, tuple]:
        key = (variant, op, batch)
        if key not in self.ready:
            if variant not in self.built:
                self.built[variant] = models.build_variant(variant)
            built = self.built[variant]
            fn = models.encode_fn(built) if op == "encode" else models.decode_fn(built)
            x = (models.images(batch, built.image_size) if op == "encode"
                 else models.features(batch, built.grid, built.code_dim))
            compiled = jax.jit(fn).lower(built.variables, x).compile()
            args = (built.variables, x)
            common.block(compiled(*args))  # warm-up
            self.ready[key] = (compiled, args)
        return self.ready[key]

    def run(self, request: dict[str, Any]) -> dict[str, Any]:
        compiled, args = self.prepare(request["variant"], request["op"], int(request["batch"]))
        runs = []
        for _ in range(int(request.get("repeats", 1))):
            t0 = time.perf_counter()
            common.block(compiled(*args))
            runs.append(time.perf_counter() - t0)
        return {**request, "runs": runs}


def main() -> None:
    common.enable_compile_cache()
    worker = Worker()
    worker_protocol.serve({"ready": True, "machine": common.machine_info()}, worker.run)


if __name__ == "__main__":
    main()
