"""Test helpers: tiny HF models with random weights, and a torch interpreter for graphs over a paged KV cache.

The interpreter runs kernel ops through kernels/<op>.py's reference() where that module exists (attention
through attention_prefill's), and every other op through the plain-torch maths below, so the same
evaluator checks traced (unfused) and optimized graphs.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect

import torch
import transformers

from artifact_format.graph import Graph, Limits
from compiler.trace import trace

TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "i32": torch.int32,
         "i64": torch.int64}
LIMITS = Limits(max_seq_len=32, max_batch=2, max_num_tokens=64, block_size=4)
SEQS = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46], [26, 43, 38, 32, 79, 50]]  # 11 tokens cross 3 blocks
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
# Three frequencies: head_dim 12 at partial rotary 0.5.
PHI3_LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.3, 1.9], "long_factor": [1.0, 2.5, 7.0]}
MODELS = {
    "llama": ("llama", {}),
    "llama3-tied": ("llama", {"rope_scaling": LLAMA3, "tie_word_embeddings": True}),
    "llama-linear": ("llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}),
    "mistral": ("mistral", {"num_key_value_heads": 1, "sliding_window": None}),
    "mistral-swa": ("mistral", {"sliding_window": 5}),  # shorter than SEQS[0]: the window hides keys
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 20}),  # head_dim != hidden / heads
    # LIMITS.max_seq_len is the original length, so the short factors apply (as in HF for these sequences).
    "phi3": ("phi3", {"rope_scaling": PHI3_LONGROPE, "partial_rotary_factor": 0.5,
                      "original_max_position_embeddings": 32, "pad_token_id": 0, "eos_token_id": 2}),
}
HF_CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "phi3": "Phi3"}


def tiny_model(kind: str, seed: int = 0, **overrides) -> tuple[dict, dict[str, torch.Tensor], torch.nn.Module]:
    """(config.json dict, state_dict, HF model) of a 2-layer model of ``kind`` with seeded random weights.

    Norm weights are 1 + noise (not HF's ones) so that folding them into linears is actually tested.
    """
    name = HF_CLASSES[kind]
    params = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, architectures=[f"{name}ForCausalLM"])
    params.update(overrides)
    config = getattr(transformers, f"{name}Config")(**params)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in pname:
                p.copy_(1 + 0.3 * noise)
            elif p.dim() == 2 and "embed" not in pname:
                p.copy_(noise / p.shape[1] ** 0.5)
            else:
                p.copy_(0.5 * noise)
    model.config._attn_implementation = "eager"
    return config.to_dict(), {k: v.clone() for k, v in model.state_dict().items()}, model


def traced(name: str, dtype: str = "fp32"):
    """(graph, weights, config, tensors, HF model) of the tiny model MODELS[name], traced."""
    kind, overrides = MODELS[name]
    config, tensors, model = tiny_model(kind, **overrides)
    graph, weights = trace(config, tensors, dtype, LIMITS)
    return graph, weights, config, tensors, model


def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] fp32 logits of one sequence from HF transformers."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def prefill_feeds(graph: Graph, limits: Limits, seqs: list[list[int]], all_rows: bool = False) -> dict:
    """Step inputs and NaN-poisoned caches for one prefill step of ``seqs``; sequence s owns blocks s*mb..."""
    mb, bs = limits.max_blocks, limits.block_size
    lens = [len(s) for s in seqs]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    positions = [p for n in lens for p in range(n)]
    slots = [(s * mb + p // bs) * bs + p % bs for s, n in enumerate(lens) for p in range(n)]
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)
    feeds = {"ids": i32([t for s in seqs for t in s]), "positions": i32(positions), "slot_mapping": i32(slots),
             "cu_seqlens_q": i32(cu), "seq_lens": i32(lens),
             "block_tables": i32([[s * mb + j for j in range(mb)] for s in range(len(seqs))]),
             "last_idx": i32(list(range(cu[-1])) if all_rows else [c - 1 for c in cu[1:]])}
    for t in graph.sources("cache"):
        feeds[t.name] = torch.full((len(seqs) * mb, *t.shape[1:]), float("nan"), dtype=TORCH[t.dtype])
    return feeds


def evaluate(graph: Graph, weights: dict, feeds: dict, use_kernel_refs: bool = True) -> dict[str, torch.Tensor]:
    """Run every node in order; returns every tensor by name (graph outputs included)."""
    env = {**weights, **feeds}
    for node in graph.nodes:
        ins = {role: env[name] for role, name in node.inputs}
        attrs = dict(node.attrs)
        ref = _kernel_reference(node.op) if use_kernel_refs else None
        if ref is not None:
            accepted = inspect.signature(ref).parameters
            result = ref(**ins, **{k: v for k, v in attrs.items() if k in accepted})
        else:
            result = OWN[node.op](ins, attrs)
        results = result if isinstance(result, tuple) else (result,)
        assert len(results) == len(node.outputs), node
        for (_, name), value in zip(node.outputs, results):
            env[name] = value.to(TORCH[graph.tensor(name).dtype]) if value.is_floating_point() else value
    return env


def _kernel_reference(op: str):
    module = f"kernels.{'attention_prefill' if op == 'attention' else op}"
    if importlib.util.find_spec(module) is None:
        return None
    return getattr(importlib.import_module(module), "reference", None)


def _norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()


def _heads(qkv: torch.Tensor, a: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hq, hk, d = a["num_q_heads"], a["num_kv_heads"], a["head_dim"]
    x = qkv.float().view(qkv.shape[0], hq + 2 * hk, d)
    return x[:, :hq], x[:, hq:hq + hk], x[:, hq + hk:]


def _rope(i: dict, a: dict) -> torch.Tensor:
    q, k, v = _heads(i["qkv"], a)
    if a["use_qk_norm"]:
        q, k = _norm(q, i["q_norm"], a["eps"]), _norm(k, i["k_norm"], a["eps"])
    half = a["rotary_dim"] // 2
    cos = i["cos_sin"][i["positions"].long(), :half][:, None, :]
    sin = i["cos_sin"][i["positions"].long(), half:][:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rest = x[..., 2 * half:]
        if a.get("is_neox", True):  # HF's rotate_half: pairs (j, j + half)
            x1, x2 = x[..., :half], x[..., half:2 * half]
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
        x1, x2 = x[..., 0:2 * half:2], x[..., 1:2 * half:2]  # GPT-J's rotate_every_two: pairs (2j, 2j + 1)
        return torch.cat([torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2), rest], dim=-1)

    i["qkv"].copy_(torch.cat([rotate(q), rotate(k), v], dim=1).reshape(i["qkv"].shape))
    if a.get("write_cache"):  # the fused form: kv_cache_write of the rotated qkv
        return (i["qkv"], *_cache_write(i, {**a, "block_size": i["k_cache"].shape[1]}))
    return i["qkv"]


def _cache_write(i: dict, a: dict) -> tuple[torch.Tensor, torch.Tensor]:
    _, k, v = _heads(i["qkv"], a)
    bs = a["block_size"]
    for t, slot in enumerate(i["slot_mapping"].tolist()):
        if slot >= 0:
            i["k_cache"][slot // bs, slot % bs] = k[t]
            i["v_cache"][slot // bs, slot % bs] = v[t]
    return i["k_cache"], i["v_cache"]


def _attention(i: dict, a: dict) -> torch.Tensor:
    q, _, _ = _heads(i["qkv"], a)
    bs, group = a["block_size"], a["num_q_heads"] // a["num_kv_heads"]
    out = torch.zeros(q.shape[0], a["num_q_heads"] * a["head_dim"])
    cu = i["cu_seqlens_q"].tolist()
    for s, n in enumerate(i["seq_lens"].tolist()):
        rows = range(cu[s], cu[s + 1])
        pos = torch.arange(n)
        blocks = i["block_tables"][s].long()[pos // bs]
        k = i["k_cache"][blocks, pos % bs].float().repeat_interleave(group, dim=1)  # [n, Hq, Dh]
        v = i["v_cache"][blocks, pos % bs].float().repeat_interleave(group, dim=1)
        qs = q[cu[s]:cu[s + 1]]
        scores = torch.einsum("qhd,khd->hqk", qs, k) * a["scale"]
        qpos = torch.arange(n - len(rows), n)
        hidden = pos[None, None, :] > qpos[None, :, None]
        if a.get("window"):
            hidden = hidden | (pos[None, None, :] <= qpos[None, :, None] - a["window"])
        scores = scores.masked_fill(hidden, float("-inf"))
        out[cu[s]:cu[s + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(len(rows), -1)
    return out


def _linear(i: dict, a: dict) -> torch.Tensor:
    out = i["x"].float() @ i["w"].float().T
    if a.get("has_bias"):
        out = out + i["bias"].float()
    if a.get("has_residual"):
        out = out + i["residual"].float()
    return _rope_epilogue(out, i, a) if a.get("act") == "rope" else out


def _rope_epilogue(y: torch.Tensor, i: dict, a: dict):
    """The rope fused into the qkv matmul: with neox pairing its q/k rows are paired, columns 2j, 2j + 1 of a head
    holding the rotation pair (j, j + Dr/2); put them back, then rope (and the cache write) as the unfused graph
    does."""
    hq, hk, d, r = a["num_q_heads"], a["num_kv_heads"], a["head_dim"], a["rotary_dim"]
    heads = y.float().view(y.shape[0], hq + 2 * hk, d).clone()
    if a["is_neox"]:  # GPT-J's pairs (2j, 2j + 1) are adjacent already
        paired = heads[:, :hq + hk, :r].clone()
        heads[:, :hq + hk, :r] = torch.cat([paired[..., 0::2], paired[..., 1::2]], dim=-1)
    inputs = {k: i[k] for k in ("positions", "cos_sin", "slot_mapping", "k_cache", "v_cache") if k in i}
    return _rope({"qkv": heads.flatten(1), **inputs}, {**a, "use_qk_norm": False})


def _silu_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def _rms_norm_linear(i: dict, a: dict) -> torch.Tensor:
    out = _linear({**i, "x": _norm(i["x"], torch.ones(i["x"].shape[1]), a["eps"])}, a)  # rope: _linear applies it
    if a.get("act") == "silu_mul":
        # The weight rows alternate gate/up; undo that to the concatenated [gate | up] silu_mul reads.
        out = _silu_mul(torch.cat([out[:, 0::2], out[:, 1::2]], dim=1))
    return out


OWN = {
    "embedding": lambda i, a: i["weight"][i["ids"].long()],
    "rms_norm": lambda i, a: _norm(i["x"], i["w"], a["eps"]),
    "add": lambda i, a: i["a"].float() + i["b"].float(),
    "mul": lambda i, a: i["a"].float() * i["b"].float(),
    "silu": lambda i, a: torch.nn.functional.silu(i["x"].float()),
    "linear": _linear,
    "concat": lambda i, a: torch.cat([i[f"x{k}"] for k in range(len(i))], dim=1),
    "qk_norm": lambda i, a: torch.cat([_norm(h, i[w], a["eps"]).flatten(1) if w else h.flatten(1)
                                       for h, w in zip(_heads(i["qkv"], a), ("q_norm", "k_norm", None))], dim=1),
    "gather": lambda i, a: i["x"][i["idx"].long()],
    "rope": _rope,
    "kv_cache_write": _cache_write,
    "attention": _attention,
    "add_rms_norm": lambda i, a: (_norm(i["x"].float() + i["residual"].float(), i["w"], a["eps"]),
                                  i["x"].float() + i["residual"].float()),
    "rms_norm_linear": _rms_norm_linear,
    "silu_mul": lambda i, a: _silu_mul(i["x"]),
    "logits": lambda i, a: _norm(i["x"][i["last_idx"].long()], i["norm_w"], a["eps"]) @ i["weight"].float().T,
}
