"""The timing workers' line protocol (``tokenizer_serve.py``, ``sample_serve.py``, ``official_t2i_serve.py``).

A worker prints one JSON "ready" line, then answers each JSON request line on stdin with one JSON line on
stdout until a ``{"quit": true}`` request or the end of input. Standard library only: the official worker runs in
another environment (torch, the official code), without jax or this repository's packages.
"""
from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from typing import Any


def serve(ready: dict[str, Any], answer: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Runs the protocol; anything ``answer`` prints goes to stderr, so stdout carries only the protocol's lines."""
    protocol = sys.stdout
    print(json.dumps(ready), file=protocol, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("quit"):
            break
        with contextlib.redirect_stdout(sys.stderr):
            reply = answer(request)
        print(json.dumps(reply), file=protocol, flush=True)
