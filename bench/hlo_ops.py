"""A small reader of optimised HLO text: what each top-level instruction (fusion, custom call, ...) does.

Used by bench/xla_profile.py to name the thunks of a profile: for every instruction it records the opcode,
the output shape, the convolutions and dots it contains (directly or in its fused computation), and their
FLOPs (2 x output elements x contracted elements), so per-op time can be turned into GFLOP/s.
"""
from __future__ import annotations

import dataclasses
import math
import re

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*(?:\(.*\))?\s*->.*\{\s*$")
_ARRAY = re.compile(r"(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")


@dataclasses.dataclass
class Instr:
    name: str
    opcode: str
    shape: str  # output shape text, layout stripped
    operands: list[str]
    attrs: str
    calls: list[str]


@dataclasses.dataclass
class OpInfo:
    """What a top-level instruction computes."""

    name: str
    opcode: str
    shape: str
    kind: str  # 'conv', 'dot', 'loop' (while / call), 'reduce', 'elementwise', 'copy', 'other'
    flops: float
    detail: str


def _split_shape(rest: str) -> tuple[str, str]:
    """'f32[2,3]{1,0} add(...)' -> ('f32[2,3]', 'add(...)'); tuples '(f32[2], s32[2]) reduce(...)' too."""
    rest = rest.strip()
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return re.sub(r"\{[^}]*\}", "", rest[: i + 1]), rest[i + 1 :].strip()
    head, _, tail = rest.partition(" ")
    return re.sub(r"\{[^}]*\}", "", head), tail.strip()


def _operands(call: str) -> tuple[str, list[str], str]:
    """'conv(%a, %b), window=...' -> ('conv', ['a', 'b'], 'window=...')."""
    opcode, _, rest = call.partition("(")
    end = _closing_paren(rest)
    args = [a.strip().split(" ")[-1].lstrip("%") for a in _top_level_split(rest[:end]) if a.strip()]
    return opcode.strip(), args, rest[end + 1 :]


def _closing_paren(text: str) -> int:
    """Index of the ')' closing a '(' that came just before ``text`` (len(text) if none)."""
    depth = 1
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return i
    return len(text)


def _top_level_split(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse(hlo_text: str) -> tuple[dict[str, dict[str, Instr]], str | None]:
    """{computation name: {instruction name: Instr}}, and the entry computation's name."""
    comps: dict[str, dict[str, Instr]] = {}
    current, entry = None, None
    for line in hlo_text.splitlines():
        if line.strip().startswith("ENTRY"):
            m = _COMP.match(line)
            current = m.group("name") if m else "ENTRY"
            entry = current
            comps[current] = {}
            continue
        m = _COMP.match(line)
        if m and "=" not in line.split("(")[0]:
            current = m.group("name")
            comps[current] = {}
            continue
        m = _INSTR.match(line)
        if not m or current is None:
            continue
        shape, call = _split_shape(m.group("rest"))
        opcode, operands, attrs = _operands(call)
        calls = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", attrs)
        comps[current][m.group("name")] = Instr(m.group("name"), opcode, shape, operands, attrs, calls)
    return comps, entry


def _dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group("dims").split(",") if d] if m else []


def _conv_flops(instr: Instr, table: dict[str, Instr]) -> tuple[float, str]:
    out = _dims(instr.shape)
    kernel = _dims(table[instr.operands[1]].shape) if len(instr.operands) > 1 and instr.operands[1] in table else []
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs)
    groups = re.search(r"feature_group_count=(\d+)", instr.attrs)
    if not out or not kernel or not labels:
        return 0.0, f"conv {instr.shape}"
    k_labels = labels.group(2)
    k_out = kernel[k_labels.index("o")]
    per_output = math.prod(kernel) / k_out / (int(groups.group(1)) if groups else 1)
    window = re.search(r"size=([\dx]+)", instr.attrs)
    stride = re.search(r"stride=([\dx]+)", instr.attrs)
    text = f"conv {instr.shape} k{window.group(1) if window else ''}" + (f"/s{stride.group(1)}" if stride else "")
    return 2.0 * math.prod(out) * per_output, f"{text} kernel {kernel}"


def _dot_flops(instr: Instr, table: dict[str, Instr]) -> tuple[float, str]:
    out = _dims(instr.shape)
    lhs = _dims(table[instr.operands[0]].shape) if instr.operands and instr.operands[0] in table else []
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
    if not lhs or not contracting:
        return 0.0, f"dot {instr.shape}"
    k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d)
    return 2.0 * math.prod(out or [1]) * k, f"dot {instr.shape} K={k}"


def _inner(comps, comp: str, seen: set[str]) -> tuple[float, list[str], set[str]]:
    """FLOPs, details and opcodes of a computation and what it calls (fusions nest)."""
    if comp in seen or comp not in comps:
        return 0.0, [], set()
    seen.add(comp)
    flops, details, opcodes = 0.0, [], set()
    table = comps[comp]
    for instr in table.values():
        opcodes.add(instr.opcode)
        if instr.opcode == "convolution":
            f, d = _conv_flops(instr, table)
            flops, details = flops + f, details + [d]
        elif instr.opcode == "dot":
            f, d = _dot_flops(instr, table)
            flops, details = flops + f, details + [d]
        for callee in instr.calls:
            f, d, o = _inner(comps, callee, seen)
            flops, details, opcodes = flops + f, details + d, opcodes | o
    return flops, details, opcodes


def describe(hlo_text: str) -> dict[str, OpInfo]:
    """OpInfo for every instruction of every computation, keyed by instruction name (names are unique)."""
    comps, _ = parse(hlo_text)
    infos: dict[str, OpInfo] = {}
    for table in comps.values():
        for instr in table.values():
            flops, details, opcodes = 0.0, [], {instr.opcode}
            if instr.opcode == "convolution":
                flops, d = _conv_flops(instr, table)
                details = [d]
            elif instr.opcode == "dot":
                flops, d = _dot_flops(instr, table)
                details = [d]
            if instr.opcode in ("fusion", "custom-call", "call", "reduce", "map", "sort", "scatter"):
                for callee in instr.calls:
                    f, d, o = _inner(comps, callee, set())
                    flops, details, opcodes = flops + f, details + d, opcodes | o
            if instr.opcode in ("while", "conditional", "call"):
                kind = "loop"
            elif "convolution" in opcodes:
                kind = "conv"
            elif "dot" in opcodes:
                kind = "dot"
            elif opcodes & {"reduce", "reduce-window"}:
                kind = "reduce"
            elif instr.opcode in ("copy", "transpose", "dynamic-slice", "dynamic-update-slice", "concatenate", "pad",
                                  "slice", "bitcast", "broadcast", "gather", "scatter"):
                kind = "copy"
            else:
                kind = "elementwise"
            infos[instr.name] = OpInfo(instr.name, instr.opcode, instr.shape, kind, flops,
                                       "; ".join(details[:3]) + (" ..." if len(details) > 3 else ""))
    return infos
