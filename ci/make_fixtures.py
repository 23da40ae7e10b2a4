#!/usr/bin/env python3
"""Generate golden fixtures for editguard's Rust model implementations.

For each of three tiny, random-weight Hugging Face causal LMs (llama, gpt2,
gptj) this writes to tests/fixtures/<arch>/:

  config.json, model.safetensors     (HF save_pretrained, float32)
  model_no_prefix.safetensors        (gpt2 only: names without "transformer.")
  golden.safetensors                 (inputs + reference activations/logits)

and tests/fixtures/README.md describing them.

Run from the repository root (no network needed; models are built from configs):

    /path/to/python ci/make_fixtures.py

Requirements: torch, transformers, safetensors (numpy is pulled in by them).
The output is deterministic: running twice gives byte-identical files.
"""

import hashlib
import inspect
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
import safetensors  # noqa: E402
from safetensors.torch import save_file, load_file  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"

# Fixed token ids: two different rows, no padding, include the edge ids 0 and 96
# and a repeated token.
INPUT_IDS = [
    [5, 17, 42, 96, 0, 63, 28],
    [88, 3, 3, 71, 50, 12, 9],
]
ADD_ROW, ADD_POS, ADD_LAYER = 0, 3, 1
DELTA_LAYER = 0


def make_llama():
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
        attn_implementation="eager",
    )
    return cfg, LlamaForCausalLM


def make_gpt2():
    cfg = GPT2Config(
        vocab_size=97,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        n_inner=None,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
        attn_implementation="eager",
    )
    return cfg, GPT2LMHeadModel


def make_gptj():
    cfg = GPTJConfig(
        vocab_size=97,
        n_embd=32,
        n_layer=2,
        n_head=4,
        rotary_dim=4,
        n_positions=64,
        n_inner=None,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return cfg, GPTJForCausalLM


# arch -> (factory, seed, accessor helpers)
ARCHS = {
    "llama": dict(
        make=make_llama,
        seed=1234,
        layers=lambda m: m.model.layers,
        down=lambda layer: layer.mlp.down_proj,
        down_name="mlp.down_proj",
        conv1d=False,
    ),
    "gpt2": dict(
        make=make_gpt2,
        seed=2345,
        layers=lambda m: m.transformer.h,
        down=lambda layer: layer.mlp.c_proj,
        down_name="mlp.c_proj",
        conv1d=True,
    ),
    "gptj": dict(
        make=make_gptj,
        seed=3456,
        layers=lambda m: m.transformer.h,
        down=lambda layer: layer.mlp.fc_out,
        down_name="mlp.fc_out",
        conv1d=False,
    ),
}


def is_norm_weight(name, p):
    return p.dim() == 1 and name.endswith(".weight") and (
        "norm" in name or ".ln_" in name or name.startswith("ln_") or ".ln_f" in name
    )


@torch.no_grad()
def reinit(model, gen):
    """Give every parameter non-trivial random values (deterministic order)."""
    seen = set()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if id(p) in seen:
            continue
        seen.add(id(p))
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if is_norm_weight(name, p):
            p.copy_(1.0 + 0.1 * noise)
        elif p.dim() == 1:  # biases (linear / conv1d / layernorm)
            p.copy_(0.1 * noise)
        else:  # matrices and embeddings
            p.copy_(0.2 * noise)
    return sorted(n for n, _ in model.named_parameters())


def block_output(output):
    # GPT-2 / Llama decoder layers return a Tensor in this transformers version,
    # GPT-J returns a tuple (hidden_states, attn_weights).
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def tensor_info(path):
    d = load_file(str(path))
    return {k: (str(v.dtype).replace("torch.", ""), list(v.shape)) for k, v in sorted(d.items())}


def save_model(model, out_dir):
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(str(out_dir), **kwargs)
    gen_cfg = out_dir / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    assert (out_dir / "model.safetensors").exists(), os.listdir(out_dir)
    assert (out_dir / "config.json").exists()


@torch.no_grad()
def build(arch):
    spec = ARCHS[arch]
    out_dir = OUT / arch
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    torch.manual_seed(spec["seed"])
    cfg, cls = spec["make"]()
    model = cls(cfg)
    model = model.float()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    gen = torch.Generator().manual_seed(spec["seed"])
    reinit(model, gen)
    model.eval()

    hidden = cfg.hidden_size
    layers = spec["layers"](model)
    n_layers = len(layers)
    assert n_layers == 2

    # ---------------- save weights ----------------
    save_model(model, out_dir)
    if arch == "gpt2":
        base = model.transformer
        sd = {}
        for name, p in base.named_parameters():  # parameters only: no attn.bias / masked_bias buffers
            sd[name] = p.detach().clone().contiguous()
        assert not any(k.startswith("transformer.") or k.startswith("lm_head") for k in sd)
        save_file(sd, str(out_dir / "model_no_prefix.safetensors"), metadata={"format": "pt"})
        # tying sanity check
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()

    # ---------------- golden data ----------------
    input_ids = torch.tensor(INPUT_IDS, dtype=torch.int64)
    golden = {"input_ids": input_ids}

    captures = {}
    handles = []
    for L, layer in enumerate(layers):
        down = spec["down"](layer)

        def pre_hook(mod, args, L=L):
            captures[f"mlp_key.{L}"] = args[0].detach().clone()

        def mlp_hook(mod, args, output, L=L):
            captures[f"mlp_out.{L}"] = output.detach().clone()

        def layer_hook(mod, args, output, L=L):
            captures[f"block_out.{L}"] = block_output(output).detach().clone()

        handles.append(down.register_forward_pre_hook(pre_hook))
        handles.append(layer.mlp.register_forward_hook(mlp_hook))
        handles.append(layer.register_forward_hook(layer_hook))

    out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    for h in handles:
        h.remove()
    logits = out.logits.detach().clone()
    assert logits.shape == (2, 7, cfg.vocab_size)
    golden["logits"] = logits
    hs = out.hidden_states
    assert len(hs) == n_layers + 1
    golden["embed_out"] = hs[0].detach().clone()
    golden["final_norm_out"] = hs[-1].detach().clone()
    for L in range(n_layers):
        golden[f"mlp_key.{L}"] = captures[f"mlp_key.{L}"]
        golden[f"mlp_out.{L}"] = captures[f"mlp_out.{L}"]
        golden[f"block_out.{L}"] = captures[f"block_out.{L}"]
        inter = captures[f"mlp_key.{L}"].shape[-1]
        assert captures[f"mlp_key.{L}"].shape == (2, 7, inter)
        assert captures[f"mlp_out.{L}"].shape == (2, 7, hidden)
        assert captures[f"block_out.{L}"].shape == (2, 7, hidden)
        if L < n_layers - 1:
            assert torch.equal(captures[f"block_out.{L}"], hs[L + 1]), f"{arch}: block_out.{L} != hidden_states[{L+1}]"
    # the final hidden state must differ from the raw last block output (final norm applied)
    assert not torch.allclose(golden[f"block_out.{n_layers-1}"], hs[-1])

    # ---- logits_added: add a vector at layer-1 MLP output, row 0, position 3 ----
    added_vector = torch.randn(hidden, generator=gen, dtype=torch.float32)
    golden["added_vector"] = added_vector
    golden["added_at"] = torch.tensor([ADD_LAYER, ADD_ROW, ADD_POS], dtype=torch.int64)

    def add_hook(mod, args, output):
        o = output.clone()
        o[ADD_ROW, ADD_POS] += added_vector
        return o

    h = layers[ADD_LAYER].mlp.register_forward_hook(add_hook)
    logits_added = model(input_ids=input_ids, use_cache=False).logits.detach().clone()
    h.remove()
    golden["logits_added"] = logits_added
    # sanity: positions before 3 unchanged, row 1 unchanged, pos>=3 of row 0 changed
    assert torch.equal(logits_added[1], logits[1])
    assert torch.equal(logits_added[0, :ADD_POS], logits[0, :ADD_POS])
    assert not torch.allclose(logits_added[0, ADD_POS], logits[0, ADD_POS])

    # ---- logits_delta: W <- W + delta on layer-0 down projection ----
    down = spec["down"](layers[DELTA_LAYER])
    W = down.weight
    orig = W.detach().clone()
    delta = 0.2 * torch.randn(W.shape, generator=gen, dtype=torch.float32)
    golden["delta"] = delta
    delta_out_in = delta.t().contiguous() if spec["conv1d"] else delta.clone()
    inter = golden[f"mlp_key.{DELTA_LAYER}"].shape[-1]
    assert delta_out_in.shape == (hidden, inter)
    golden["delta_out_in"] = delta_out_in
    W.add_(delta)
    logits_delta = model(input_ids=input_ids, use_cache=False).logits.detach().clone()
    W.copy_(orig)
    golden["logits_delta"] = logits_delta
    assert not torch.allclose(logits_delta, logits)
    logits_back = model(input_ids=input_ids, use_cache=False).logits
    assert torch.equal(logits_back, logits), f"{arch}: logits not restored bit-for-bit"

    # Cross-check the delta orientation with a manual computation of layer-0 mlp output.
    key0 = golden[f"mlp_key.{DELTA_LAYER}"]
    manual_extra = key0 @ delta_out_in.t()  # (2,7,hidden)
    if spec["conv1d"]:
        ref_extra = key0 @ delta  # Conv1D: x @ W
    else:
        ref_extra = torch.nn.functional.linear(key0, delta)
    assert torch.allclose(manual_extra, ref_extra, atol=1e-5)

    golden = {k: v.contiguous() for k, v in golden.items()}
    save_file(golden, str(out_dir / "golden.safetensors"), metadata={"arch": arch})

    # ---------------- round-trip checks ----------------
    reloaded = cls.from_pretrained(str(out_dir), attn_implementation="eager", dtype=torch.float32)
    reloaded.eval()
    rl = reloaded(input_ids=input_ids, use_cache=False).logits
    assert torch.equal(rl, logits), f"{arch}: reloaded model logits differ"
    if arch == "gpt2":
        m2 = cls(cfg).eval()
        missing, unexpected = m2.transformer.load_state_dict(
            load_file(str(out_dir / "model_no_prefix.safetensors")), strict=False
        )
        assert not unexpected, unexpected
        param_names = {n for n, _ in m2.transformer.named_parameters()}
        assert not (set(missing) & param_names), missing  # only non-persistent buffers may be missing
        m2.tie_weights()
        assert torch.equal(m2(input_ids=input_ids, use_cache=False).logits, logits), "gpt2 no-prefix mismatch"

    return out_dir


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fmt_table(info):
    lines = []
    for k, (dt, shape) in info.items():
        lines.append(f"| `{k}` | {dt} | {tuple(shape)} |")
    return "\n".join(lines)


GOLDEN_DOC = """\
| name | dtype | shape | meaning |
|---|---|---|---|
| `input_ids` | int64 | (2, 7) | fixed token ids, two different rows, no padding; positions are 0..6, no attention mask |
| `logits` | f32 | (2, 7, 97) | model logits for `input_ids` |
| `embed_out` | f32 | (2, 7, H) | extra: `hidden_states[0]` (token embeddings; gpt2 = wte + wpe) |
| `final_norm_out` | f32 | (2, 7, H) | extra: `hidden_states[-1]`, i.e. last block output after the final norm (llama `model.norm`, gpt2/gptj `ln_f`) |
| `mlp_key.L` | f32 | (2, 7, I) | input of the MLP down projection of layer L (llama `mlp.down_proj`, gpt2 `mlp.c_proj`, gptj `mlp.fc_out`), i.e. after the activation (llama: `silu(gate) * up`) |
| `mlp_out.L` | f32 | (2, 7, H) | output of the whole `mlp` module of layer L (down projection incl. bias) |
| `block_out.L` | f32 | (2, 7, H) | output hidden state of decoder layer L (before the final norm, also for the last layer) |
| `added_vector` | f32 | (H,) | random vector, std 1.0 |
| `added_at` | int64 | (3,) | `[layer, batch_row, position]` = `[1, 0, 3]` where `added_vector` is added |
| `logits_added` | f32 | (2, 7, 97) | logits when `added_vector` is added to the output of layer-1 `mlp` at batch row 0, position 3 only |
| `delta` | f32 | HF orientation | random update (std 0.2) of the layer-0 down-projection weight, in the HF module's own `weight` orientation: llama `(H, I)` = (out, in); gptj `(H, I)` = (out, in); gpt2 Conv1D `(I, H)` = (in, out) |
| `delta_out_in` | f32 | (H, I) | the same delta in (out_features, in_features) orientation (gpt2: `delta.T`; llama/gptj: identical to `delta`) |
| `logits_delta` | f32 | (2, 7, 97) | logits with layer-0 down-projection weight `W + delta` (everything else unchanged) |

H = hidden size = 32. I = intermediate size: llama 64, gpt2 128 (4*H), gptj 128 (4*H).
"""


NOTES = """\
- Causal attention, no mask/padding, positions 0..T-1, scores scaled by 1/sqrt(head_dim), softmax in f32.
- All three use `gelu_new`/`silu` as configured: `gelu_new(x) = 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3)))`.
- **llama**: RMSNorm `x * rsqrt(mean(x^2) + eps) * w`; RoPE in "rotate_half" layout (pairs `(i, i + d/2)`)
  over the whole head (head_dim 8); GQA with 4 query heads / 2 kv heads: query head `h` uses kv head
  `h / 2`. No biases anywhere. Separate `lm_head.weight`. With transformers 5.x, config.json stores the
  RoPE base as `rope_parameters.rope_theta` (no top-level `rope_theta`, which older/hub configs have).
- **gpt2**: learned position embeddings `wpe`; `c_attn` output is `[q | k | v]` along the last dim;
  Conv1D weights are (in, out); pre-LN blocks with `ln_1`, `ln_2`, final `ln_f`; logits = `ln_f(x) @ wte^T`.
- **gptj**: parallel block `x + attn(ln_1(x)) + mlp(ln_1(x))` (single `ln_1`, no `ln_2`);
  q/k/v/out projections have **no bias**; `fc_in`/`fc_out` and `lm_head` **have** biases; untied lm_head.
  Rotary is applied only to the first `rotary_dim` = 4 of the 8 dims of each head (the rest pass through),
  in the interleaved "rotate_every_two" layout: pairs `(0,1), (2,3)`, `inv_freq[j] = 10000^(-2j/rotary_dim)`,
  `out[2j] = x[2j]*cos - x[2j+1]*sin`, `out[2j+1] = x[2j+1]*cos + x[2j]*sin` (base 10000 is hard-coded,
  not in config.json).
- An independent plain-torch re-implementation matched `logits`, `mlp_key.*`, `mlp_out.*`, `block_out.*`,
  `logits_added`, `logits_delta` to <= 4e-6 max abs error; logits have std ~1.1, so a tolerance of ~1e-4
  is comfortable for the Rust tests.
"""


def write_readme(results):
    tv, trv, sv = torch.__version__, transformers.__version__, safetensors.__version__
    parts = []
    parts.append("# Golden fixtures for editguard model implementations\n")
    parts.append(
        "Tiny random-weight Hugging Face causal LMs (`llama`, `gpt2`, `gptj`) plus reference outputs\n"
        "computed with PyTorch/transformers, so the Rust re-implementations can be tested without Python.\n"
        "All weights are float32; every parameter was re-initialised with non-trivial random values\n"
        "(matrices/embeddings N(0, 0.2^2), norm weights 1 + 0.1*N(0,1), biases 0.1*N(0,1)) so a mistake in\n"
        "any parameter shows up in the logits. Attention implementation: eager. No padding, no attention mask.\n"
    )
    parts.append("## Regenerating\n")
    parts.append(
        "From the repository root (no network access needed; models are built from configs):\n\n"
        "```sh\n/path/to/python ci/make_fixtures.py\n```\n\n"
        "Requirements: `torch`, `transformers`, `safetensors` (and `numpy`). The script is deterministic\n"
        "(single-threaded, fixed seeds): running it twice gives byte-identical files.\n"
    )
    parts.append(
        f"Generated with: Python {sys.version.split()[0]}, torch {tv}, transformers {trv}, safetensors {sv}.\n"
        "Other versions may give tiny float differences (and a different `transformers_version` in config.json).\n"
    )
    parts.append("## Layout\n")
    parts.append(
        "```\n"
        "tests/fixtures/<arch>/config.json               HF config (save_pretrained)\n"
        "tests/fixtures/<arch>/model.safetensors         HF weights (save_pretrained), f32\n"
        "tests/fixtures/gpt2/model_no_prefix.safetensors same gpt2 weights without the `transformer.` prefix\n"
        "                                                (naming of the real openai-community/gpt2 checkpoint,\n"
        "                                                e.g. `h.0.attn.c_attn.weight`, `wte.weight`; no lm_head)\n"
        "tests/fixtures/<arch>/golden.safetensors        inputs and reference activations (below)\n"
        "```\n\n"
        "gpt2 ties `lm_head.weight` to `wte.weight`; its model.safetensors contains no `lm_head.weight`.\n"
        "gpt2 Conv1D weights are stored (in, out): `y = x @ W + b`.\n"
    )
    parts.append("## Notes for implementers\n")
    parts.append(NOTES)
    parts.append("## golden.safetensors\n")
    parts.append(GOLDEN_DOC)
    parts.append("## Files\n")
    for arch, r in results.items():
        parts.append(f"### {arch}\n")
        parts.append("| file | bytes |\n|---|---|")
        parts.append("\n".join(f"| `{f}` | {s} |" for f, s in r["files"]))
        parts.append("")
        for fname, info in r["tensors"].items():
            parts.append(f"`{fname}`:\n\n| tensor | dtype | shape |\n|---|---|---|")
            parts.append(fmt_table(info))
            parts.append("")
    (OUT / "README.md").write_text("\n".join(parts) + "\n")


def main():
    print(f"python {sys.version.split()[0]}  torch {torch.__version__}  transformers {transformers.__version__}"
          f"  safetensors {safetensors.__version__}")
    OUT.mkdir(parents=True, exist_ok=True)
    results = {}
    for arch in ("llama", "gpt2", "gptj"):
        d = build(arch)
        for p in d.iterdir():
            os.chmod(p, 0o644)  # save_file creates 0600 files
        files = sorted((p.name, p.stat().st_size) for p in d.iterdir())
        tensors = {p.name: tensor_info(p) for p in sorted(d.glob("*.safetensors"))}
        results[arch] = dict(files=files, tensors=tensors)
        total = sum(s for _, s in files)
        # gpt2 is ~320 KB: two copies of the weights (with/without prefix) and a 4*H-wide MLP.
        assert total < 400 * 1024, f"{arch} fixtures too large: {total}"
    write_readme(results)

    print("\n== summary ==")
    for arch, r in results.items():
        total = sum(s for _, s in r["files"])
        print(f"{arch}/  (total {total} bytes)")
        for f, s in r["files"]:
            print(f"  {f:32s} {s:8d}  sha256 {sha256(OUT / arch / f)[:16]}")
    print(f"README.md {(OUT / 'README.md').stat().st_size} bytes")


if __name__ == "__main__":
    main()
