"""A float32 torch implementation of the released TokenFlow text-to-image model's forward pass, for parity tests.

Written from ByteFlow-AI/TokenFlow ``t2i/llava_t2i`` (transformers 4.43): ``modeling_llama.LlamaDecoderLayer``
with the input norms commented out and each sub-block's output normalised before the residual add,
``llava_arch.QKNorm`` (RMSNorm(head_dim, eps 1e-6) on per-head q and k before RoPE, cast to v's dtype) and
``llava_arch.prepare_inputs_labels_for_multimodal_generation`` (projected running maps at the image positions,
``lvl_embed`` and ``pos_1LC`` added). It reads the OFFICIAL state dict (HF names, ``nn.Linear`` weights
[out, in]), never this project's parameters, so a converter test checks names, layouts and numerics at once.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # LlamaRMSNorm
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def decoder_logits(state: dict[str, torch.Tensor], *, heads: int, kv_heads: int, eps: float, theta: float,
                   embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [B, L, V] of the official decoder on input embeddings [B, L, D].

    positions: [B, L] RoPE positions; mask: [B, L, L] bool (True = attend), turned into HF's additive
    0 / finfo.min mask.
    """
    b, length, d = embeds.shape
    dh = d // heads
    inv_freq = 1.0 / (theta ** (torch.arange(0, dh, 2, dtype=torch.int64).float() / dh))
    freqs = positions.float()[:, :, None] * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # [B, 1, L, Dh]
    bias = torch.where(mask[:, None], 0.0, torch.finfo(torch.float32).min)
    x = embeds
    depth = len({k.split(".")[2] for k in state if k.startswith("model.layers.")})
    for i in range(depth):
        p = f"model.layers.{i}."
        q = F.linear(x, state[p + "self_attn.q_proj.weight"]).view(b, length, heads, dh).transpose(1, 2)
        k = F.linear(x, state[p + "self_attn.k_proj.weight"]).view(b, length, kv_heads, dh).transpose(1, 2)
        v = F.linear(x, state[p + "self_attn.v_proj.weight"]).view(b, length, kv_heads, dh).transpose(1, 2)
        q = _rms(q, state[p + "self_attn.qknorm.query_norm.weight"], 1e-6).to(v)
        k = _rms(k, state[p + "self_attn.qknorm.key_norm.weight"], 1e-6).to(v)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
        weights = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(dh) + bias, dim=-1, dtype=torch.float32)
        out = F.linear((weights @ v).transpose(1, 2).reshape(b, length, d), state[p + "self_attn.o_proj.weight"])
        x = x + _rms(out, state[p + "input_layernorm.weight"], eps)  # residual + norm(attn(x))
        hidden = F.linear(F.silu(F.linear(x, state[p + "mlp.gate_proj.weight"])) *
                          F.linear(x, state[p + "mlp.up_proj.weight"]), state[p + "mlp.down_proj.weight"])
        x = x + _rms(hidden, state[p + "post_attention_layernorm.weight"], eps)  # residual + norm(mlp(x))
    return F.linear(_rms(x, state["model.norm.weight"], eps), state["lm_head.weight"])


def teacher_forced_logits(state: dict[str, torch.Tensor], *, heads: int, kv_heads: int, eps: float, theta: float,
                          scales: tuple[int, ...], text_ids: np.ndarray, text_mask: np.ndarray,
                          code_vectors: np.ndarray) -> np.ndarray:
    """Logits [B, N, V] predicting image tokens 0..N-1 (positions P-1 .. P+N-2), as the official training
    forward computes them.

    text_ids, text_mask: [B, P] left-padded prefix (ending with the "<img>" pieces); code_vectors: [B, N, C]
    the unit-norm codebook vectors of the target indices, scale by scale, row-major.
    """
    b, p = text_ids.shape
    n = code_vectors.shape[1]
    codes = torch.tensor(code_vectors)
    # Running maps: f_1 = c_1; g_k = bicubic(f_k -> s_{k+1}); f_{k+1} = g_k + c_{k+1}
    # (``vision_tokenizer.VQTower.forward``).
    offsets = np.cumsum([0] + [s * s for s in scales])
    f = codes[:, :1].reshape(b, 1, 1, -1).permute(0, 3, 1, 2)
    inputs = []
    for k in range(1, len(scales)):
        s = scales[k]
        g = F.interpolate(f, size=(s, s), mode="bicubic", align_corners=False)
        inputs.append(g.permute(0, 2, 3, 1).reshape(b, s * s, -1))
        f = g + codes[:, offsets[k] : offsets[k + 1]].reshape(b, s, s, -1).permute(0, 3, 1, 2)
    image = torch.cat(inputs, dim=1)  # [B, N - 1, C]
    image = F.linear(F.gelu(F.linear(image, state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"])),
                     state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"])
    text = state["model.embed_tokens.weight"][torch.tensor(text_ids, dtype=torch.long)]
    embeds = torch.cat([text, image], dim=1)  # [B, L = P + N - 1, D]
    length = embeds.shape[1]
    scale_of = np.concatenate([np.full(s * s, i) for i, s in enumerate(scales)])
    level = np.zeros(length, np.int64)
    level[p:] = scale_of[1:] + 1  # the input predicting token j + 1 gets lvl_embed[its scale + 1]
    embeds = embeds + state["model.lvl_embed.weight"][torch.tensor(level)]
    pos = torch.zeros_like(embeds[0])
    pos[p - 1 : p - 1 + n] = state["model.pos_1LC"]  # row t at the position predicting token t
    embeds = embeds + pos
    # Causal with padded keys masked, then block-causal over the image positions P-1 .. (as in
    # ``llava_arch.prepare_inputs_labels_for_multimodal_generation``).
    allowed = np.tril(np.ones((length, length), bool))
    allowed[p - 1 :, p - 1 :] = scale_of[None, :] <= scale_of[:, None]
    keys = np.concatenate([np.asarray(text_mask, bool), np.ones((b, length - p), bool)], axis=1)
    mask = torch.tensor(allowed[None] & keys[:, None, :])
    positions = torch.arange(length)[None].expand(b, length)
    logits = decoder_logits(state, heads=heads, kv_heads=kv_heads, eps=eps, theta=theta, embeds=embeds,
                            positions=positions, mask=mask)
    return logits[:, p - 1 :].numpy()
