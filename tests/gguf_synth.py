"""Random GGUF tensors of each natively served type, as raw blocks, and a tiny Llama GGUF file made of them.

Types gguf can quantize (Q4_0, Q4_1, Q8_0) are quantized from random weights with gguf.quants.quantize; the K types
(and Q2_K, one the kernels do not read) are random block bytes with small fp16 scales, which gguf cannot make itself:
every byte pattern is a valid block, so they are as good a test of the repack as real ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# type name -> (block bytes, block values, byte offsets of the fp16 scale fields, their size: weights of ~0.05)
K_TYPES = {"Q4_K": (144, 256, (0, 2), 1e-4), "Q5_K": (176, 256, (0, 2), 5e-5), "Q6_K": (210, 256, (208,), 2e-5),
           "Q2_K": (84, 256, (80, 82), 2e-3)}


def random_blocks(type_name: str, rows: int, cols: int, seed: int = 0, small: bool = False) -> np.ndarray:
    """[rows, bytes per row] uint8, the raw data of a [rows, cols] tensor of that type (F16 / F32: the values).
    small: K-type scales sized for a model's weights (~0.05), else up to 1e-2."""
    import gguf

    rng = np.random.default_rng(seed)
    if type_name not in K_TYPES:
        w = (rng.standard_normal((rows, cols)) * 0.05 + rng.standard_normal((rows, 1)) * 0.01).astype(np.float32)
        if type_name in ("F16", "F32"):
            return w.astype(np.float16 if type_name == "F16" else np.float32)
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType[type_name])
    nbytes, values, scales, size = K_TYPES[type_name]
    blocks = rng.integers(0, 256, (rows * cols // values, nbytes), dtype=np.uint8)
    for off in scales:
        d = (rng.random(blocks.shape[0]) * size + size / 10) if small else (rng.random(blocks.shape[0]) * 0.01 + 1e-4)
        blocks[:, off:off + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def dequantized(type_name: str, data: np.ndarray) -> np.ndarray:
    """gguf's own reference dequantization, fp32 [rows, cols]."""
    import gguf

    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name]).astype(np.float32)


# A Q4_K_M-like mix over two layers: layer 0's q/k/v of three layouts (merged into int8_group per 16), layer 1's q/k/v
# F16 and its gate Q2_K (not native: their merges stay dequantized, with a note), a Q6_K lm_head.
MIXED_TYPES = {"token_embd.weight": "Q8_0", "output.weight": "Q6_K",
               "blk.0.attn_q.weight": "Q4_K", "blk.0.attn_k.weight": "Q4_0", "blk.0.attn_v.weight": "Q6_K",
               "blk.0.attn_output.weight": "Q5_K", "blk.0.ffn_gate.weight": "Q4_1", "blk.0.ffn_up.weight": "Q4_1",
               "blk.0.ffn_down.weight": "Q4_K",
               "blk.1.attn_q.weight": "F16", "blk.1.attn_k.weight": "F16", "blk.1.attn_v.weight": "F16",
               "blk.1.attn_output.weight": "Q8_0", "blk.1.ffn_gate.weight": "Q2_K", "blk.1.ffn_up.weight": "Q8_0",
               "blk.1.ffn_down.weight": "Q6_K"}
HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2


def write_mixed_gguf(path: Path, types: dict[str, str] = MIXED_TYPES) -> Path:
    """A 2-layer Llama (hidden 256, intermediate 512, GQA 4:2, head_dim 64, untied) as a GGUF file, each matrix of its
    type in ``types``, the tokenizer tiny-llama's (vocab 384)."""
    import json

    import gguf

    from compiler.frontends import load_source

    src = load_source("tiny-llama")
    vocab_size = src.config["vocab_size"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab_size)
    tok = json.loads(src.tokenizer_json)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in tok["added_tokens"]}
    tokens = [t for t, _ in vocab] + [f"[PAD{i}]" for i in range(len(vocab), vocab_size)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials or t.startswith("[PAD") else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_bos_token_id(src.config["bos_token_id"])
    w.add_eos_token_id(src.config["eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(src.tokenizer_config["chat_template"])
    hd = HIDDEN // HEADS
    shapes = {"token_embd": (vocab_size, HIDDEN), "output": (vocab_size, HIDDEN), "attn_q": (HIDDEN, HIDDEN),
              "attn_k": (KV_HEADS * hd, HIDDEN), "attn_v": (KV_HEADS * hd, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
              "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN), "ffn_down": (HIDDEN, INTER)}
    rng = np.random.default_rng(0)
    for seed, (name, type_name) in enumerate(types.items()):
        rows, cols = shapes[name.split(".")[-2]]
        data = random_blocks(type_name, rows, cols, seed=seed, small=True)
        raw = None if type_name in ("F16", "F32") else gguf.GGMLQuantizationType[type_name]
        w.add_tensor(name, data, raw_dtype=raw)
    for name in ["output_norm.weight", *(f"blk.{i}.{n}.weight" for i in range(LAYERS) for n in ("attn_norm",
                                                                                                 "ffn_norm"))]:
        w.add_tensor(name, (1 + 0.2 * rng.standard_normal(HIDDEN)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
