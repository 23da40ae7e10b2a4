"""Writes the GGUF seed files of the `gguf` fuzz target: a tiny llama (byte-level BPE vocabulary) and a tiny gemma3
(SentencePiece vocabulary), each a complete, loadable model of a few kilobytes with random weights.

Run from the fuzz folder with the `gguf` package (pip install gguf numpy):
    python seeds/make_gguf_seeds.py corpus/gguf
"""

import sys
from pathlib import Path

import numpy as np
import gguf

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 8, 16, 2, 1, 1
HEAD_DIM = HIDDEN // HEADS


def tensors(writer, rng, prefix_norms, vocab):
    def add(name, *shape):
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    add("token_embd.weight", vocab, HIDDEN)
    add("output_norm.weight", HIDDEN)
    for layer in range(LAYERS):
        block = f"blk.{layer}"
        add(f"{block}.attn_norm.weight", HIDDEN)
        add(f"{block}.attn_q.weight", HEADS * HEAD_DIM, HIDDEN)
        add(f"{block}.attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        add(f"{block}.attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        add(f"{block}.attn_output.weight", HIDDEN, HEADS * HEAD_DIM)
        add(f"{block}.ffn_norm.weight", HIDDEN)
        add(f"{block}.ffn_gate.weight", FFN, HIDDEN)
        add(f"{block}.ffn_up.weight", FFN, HIDDEN)
        add(f"{block}.ffn_down.weight", HIDDEN, FFN)
        for name, size in prefix_norms:
            add(f"{block}.{name}.weight", size)


def llama(path):
    rng = np.random.default_rng(0)
    tokens = ["a", "b", "c", "Ġ", "ab", "Ġa", "<s>", "</s>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_context_length(64)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 6 + [3, 3])
    writer.add_token_merges(["a b", "Ġ a"])
    writer.add_bos_token_id(6)
    tensors(writer, rng, [], len(tokens))
    finish(writer)


def gemma3(path):
    rng = np.random.default_rng(1)
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "▁", "a", "b", "▁a", "ab", "<0x41>", "\n\n"]
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_sliding_window(4)
    writer.add_rope_freq_base(1e6)
    writer.add_context_length(64)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -1.5, -2.5, 0.0, 0.0])
    writer.add_token_types([3, 3, 3, 2, 1, 1, 1, 1, 1, 6, 4])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    norms = [("attn_q_norm", HEAD_DIM), ("attn_k_norm", HEAD_DIM), ("post_attention_norm", HIDDEN),
             ("post_ffw_norm", HIDDEN)]
    tensors(writer, rng, norms, len(tokens))
    finish(writer)


def finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    llama(out / "tiny-llama.gguf")
    gemma3(out / "tiny-gemma3.gguf")
