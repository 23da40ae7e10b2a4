#!/usr/bin/env python3
"""Generate golden fixtures for editguard's Rust model implementations.

For each of four tiny, random-weight Hugging Face causal LMs (llama, gpt2,
gptj, gemma3) this writes to tests/fixtures/<arch>/:

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
import math
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
from transformers.activations import GELUTanh  # noqa: E402
from transformers import (  # noqa: E402
    Gemma3ForCausalLM,
    Gemma3TextConfig,
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
# gemma3 uses longer rows (same first 7 ids) so that its sliding window (4) cuts off
# keys at 5 of the 9 query positions (4..8) rather than 3 of 7.
INPUT_IDS_GEMMA3 = [
    [5, 17, 42, 96, 0, 63, 28, 44, 81],
    [88, 3, 3, 71, 50, 12, 9, 96, 20],
]
ADD_ROW, ADD_POS, ADD_LAYER = 0, 3, 1
DELTA_LAYER = 0
GEMMA3_SLIDING_WINDOW = 4


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


def make_gemma3():
    # Text-only Gemma 3 (model_type "gemma3_text"), shaped like google/gemma-3-270m in miniature:
    # 4 query heads / 1 kv head, head_dim 16 with heads*head_dim (64) != hidden (32), tied embeddings,
    # no softcapping, sliding layers 0 and 2 (window 4) and full-attention layers 1 and 3.
    # query_pre_attn_scalar = head_dim (16), as in the real model (256 = its head_dim).
    cfg = Gemma3TextConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=False,
        attention_dropout=0.0,
        query_pre_attn_scalar=16,
        sliding_window=GEMMA3_SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        use_bidirectional_attention=False,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        attn_implementation="eager",
    )
    # Legacy int saved as `_sliding_window_pattern` (default 6), only consulted when layer_types is None;
    # set it to 2 so that config.json is self-consistent (every 2nd layer is full attention).
    cfg._sliding_window_pattern = 2
    return cfg, Gemma3ForCausalLM


# arch -> (factory, seed, accessor helpers)
ARCHS = {
    "llama": dict(
        make=make_llama,
        seed=1234,
        layers=lambda m: m.model.layers,
        down=lambda layer: layer.mlp.down_proj,
        down_name="mlp.down_proj",
        conv1d=False,
        n_layers=2,
        input_ids=INPUT_IDS,
        norm_base=1.0,
    ),
    "gpt2": dict(
        make=make_gpt2,
        seed=2345,
        layers=lambda m: m.transformer.h,
        down=lambda layer: layer.mlp.c_proj,
        down_name="mlp.c_proj",
        conv1d=True,
        n_layers=2,
        input_ids=INPUT_IDS,
        norm_base=1.0,
    ),
    "gptj": dict(
        make=make_gptj,
        seed=3456,
        layers=lambda m: m.transformer.h,
        down=lambda layer: layer.mlp.fc_out,
        down_name="mlp.fc_out",
        conv1d=False,
        n_layers=2,
        input_ids=INPUT_IDS,
        norm_base=1.0,
    ),
    "gemma3": dict(
        make=make_gemma3,
        seed=4567,
        layers=lambda m: m.model.layers,
        down=lambda layer: layer.mlp.down_proj,
        down_name="mlp.down_proj",
        conv1d=False,
        n_layers=4,
        input_ids=INPUT_IDS_GEMMA3,
        # Gemma's RMSNorm multiplies by (1 + w): draw w = 0.1*N(0,1) so the effective scale is ~1.
        norm_base=0.0,
    ),
}


def is_norm_weight(name, p):
    return p.dim() == 1 and name.endswith(".weight") and (
        "norm" in name or ".ln_" in name or name.startswith("ln_") or ".ln_f" in name
    )


@torch.no_grad()
def reinit(model, gen, norm_base=1.0):
    """Give every parameter non-trivial random values (deterministic order).

    Norm weights become norm_base + 0.1*N(0,1): 1 + ... for the usual `x_norm * w`, 0 + ... for Gemma's
    `x_norm * (1 + w)`."""
    seen = set()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if id(p) in seen:
            continue
        seen.add(id(p))
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if is_norm_weight(name, p):
            p.copy_(norm_base + 0.1 * noise)
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


def _gemma3_reference(model, input_ids, window, scale=None, add=None, delta=None):
    """Independent float64 re-implementation of Gemma3ForCausalLM (text) from the state dict.

    window: sliding window of the "sliding_attention" layers (None = plain causal there too).
    Returns dict with logits, embed, final, per-layer mlp_key / mlp_out / block_out.
    """
    cfg = model.config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    H, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps = cfg.rms_norm_eps
    if scale is None:
        scale = cfg.query_pre_attn_scalar ** -0.5
    B, T = input_ids.shape

    def rms(x, w):  # Gemma: x * rsqrt(mean(x^2) + eps) * (1 + w)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w)

    def gelu_tanh(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))

    def rope(x, theta):  # x: (B, heads, T, hd); "rotate_half" layout, pairs (i, i + hd/2)
        inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]  # (T, hd/2)
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    wE = sd["model.embed_tokens.weight"]
    x = wE[input_ids] * math.sqrt(H)
    out = {"embed": x.clone()}
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    for L, ltype in enumerate(cfg.layer_types):
        p = f"model.layers.{L}."
        theta = cfg.rope_parameters[ltype]["rope_theta"]
        visible = j <= i
        if ltype == "sliding_attention" and window is not None:
            visible = visible & (j > i - window)
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].t()).view(B, T, nh, hd).transpose(1, 2)
        k = (h @ sd[p + "self_attn.k_proj.weight"].t()).view(B, T, nkv, hd).transpose(1, 2)
        v = (h @ sd[p + "self_attn.v_proj.weight"].t()).view(B, T, nkv, hd).transpose(1, 2)
        q = rope(rms(q, sd[p + "self_attn.q_norm.weight"]), theta)  # per-head norm, then rotary
        k = rope(rms(k, sd[p + "self_attn.k_norm.weight"]), theta)
        k = k.repeat_interleave(nh // nkv, dim=1)  # query head h uses kv head h // (nh / nkv)
        v = v.repeat_interleave(nh // nkv, dim=1)
        s = (q @ k.transpose(-1, -2)) * scale
        s = s.masked_fill(~visible, float("-inf"))
        a = torch.softmax(s, -1) @ v  # (B, nh, T, hd)
        a = a.transpose(1, 2).reshape(B, T, nh * hd) @ sd[p + "self_attn.o_proj.weight"].t()
        x = x + rms(a, sd[p + "post_attention_layernorm.weight"])
        h = rms(x, sd[p + "pre_feedforward_layernorm.weight"])
        key = gelu_tanh(h @ sd[p + "mlp.gate_proj.weight"].t()) * (h @ sd[p + "mlp.up_proj.weight"].t())
        wd = sd[p + "mlp.down_proj.weight"]
        if delta is not None and L == DELTA_LAYER:
            wd = wd + delta.double()
        mo = key @ wd.t()
        if add is not None and L == ADD_LAYER:
            mo = mo.clone()
            mo[ADD_ROW, ADD_POS] += add.double()
        out[f"mlp_key.{L}"], out[f"mlp_out.{L}"] = key, mo
        x = x + rms(mo, sd[p + "post_feedforward_layernorm.weight"])
        out[f"block_out.{L}"] = x
    fin = rms(x, sd["model.norm.weight"])
    out["final"] = fin
    out["logits"] = fin @ wE.t()  # tied lm_head = the UNscaled embedding matrix
    return out


def verify_gemma3(model, golden):
    """Check the semantics documented in tests/fixtures/README.md against the HF model (no RNG use)."""
    cfg = model.config
    ids = golden["input_ids"]
    T = ids.shape[1]
    W = cfg.sliding_window
    assert W == GEMMA3_SLIDING_WINDOW and T > W
    assert cfg.final_logit_softcapping is None and cfg.attn_logit_softcapping is None
    assert cfg.layer_types == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    for L, layer in enumerate(model.model.layers):
        att = layer.self_attn
        assert att.sliding_window == (W if L % 2 == 0 else None), (L, att.sliding_window)
        assert att.scaling == cfg.query_pre_attn_scalar ** -0.5 == 0.25
    assert isinstance(model.model.layers[0].mlp.act_fn, GELUTanh)
    rot = model.model.rotary_emb
    for ltype, theta in (("full_attention", 1e6), ("sliding_attention", 1e4)):
        inv = 1.0 / (theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim))
        assert torch.equal(getattr(rot, f"{ltype}_inv_freq"), inv), ltype

    # Embedding scale: a float32 buffer torch.tensor(sqrt(H)) cast to the weight dtype (f32 here),
    # multiplied in the weight dtype.
    emb = model.model.embed_tokens
    assert emb.embed_scale.dtype == torch.float32
    scale32 = torch.tensor(math.sqrt(cfg.hidden_size), dtype=torch.float32)
    assert torch.equal(emb.embed_scale, scale32)
    assert torch.equal(golden["embed_out"], emb.weight[ids] * scale32)
    assert not torch.equal(golden["embed_out"], emb.weight[ids] * scale32.to(torch.bfloat16).float())

    # Attention pattern actually used by eager attention: probabilities that are exactly zero.
    res = model(input_ids=ids, output_attentions=True, use_cache=False)
    assert torch.equal(res.logits, golden["logits"])
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    for L, probs in enumerate(res.attentions):
        seen = probs != 0  # (B, heads, T, T)
        expect = (j <= i) & ((j > i - W) if L % 2 == 0 else True)
        assert torch.equal(seen, expect.expand_as(seen)), f"gemma3 layer {L}: unexpected attention pattern"
    print(f"  gemma3: sliding layers 0,2: query i sees keys j with i-{W} < j <= i; layers 1,3 see all j <= i")

    # Independent float64 re-implementation.
    ref = _gemma3_reference(model, ids, W)

    def err(a, b):
        return (a.double() - b.double()).abs().max().item()

    errs = {"logits": err(ref["logits"], golden["logits"]), "embed_out": err(ref["embed"], golden["embed_out"]),
            "final_norm_out": err(ref["final"], golden["final_norm_out"])}
    for L in range(cfg.num_hidden_layers):
        for n in ("mlp_key", "mlp_out", "block_out"):
            errs[f"{n}.{L}"] = err(ref[f"{n}.{L}"], golden[f"{n}.{L}"])
    errs["logits_added"] = err(_gemma3_reference(model, ids, W, add=golden["added_vector"])["logits"],
                               golden["logits_added"])
    errs["logits_delta"] = err(_gemma3_reference(model, ids, W, delta=golden["delta"])["logits"],
                               golden["logits_delta"])
    worst = max(errs.values())
    print(f"  gemma3: float64 re-implementation max abs error {worst:.2e} "
          f"(logits {errs['logits']:.2e}, logits std {golden['logits'].std().item():.2f})")
    assert worst < 2e-5, errs

    # The window bites, and an off-by-one (or a missing window / a head_dim-based scale) is detectable.
    for w_alt in (None, W - 1, W + 1):
        d = err(_gemma3_reference(model, ids, w_alt)["logits"], golden["logits"])
        print(f"  gemma3: window {w_alt} instead of {W}: logits differ by up to {d:.3f}")
        assert d > 1e-2, (w_alt, d)
    d = err(_gemma3_reference(model, ids, W, scale=1.0 / 256 ** 0.5)["logits"], golden["logits"])
    assert d > 1e-2, d
    # Tied lm_head uses the unscaled embedding matrix.
    scaled = golden["final_norm_out"].double() @ (emb.weight.double() * math.sqrt(cfg.hidden_size)).t()
    assert err(scaled, golden["logits"]) > 1.0


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
    reinit(model, gen, spec["norm_base"])
    model.eval()

    hidden = cfg.hidden_size
    layers = spec["layers"](model)
    n_layers = len(layers)
    assert n_layers == spec["n_layers"]
    batch, tokens = len(spec["input_ids"]), len(spec["input_ids"][0])

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
    if arch == "gemma3":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert "lm_head.weight" not in load_file(str(out_dir / "model.safetensors"))

    # ---------------- golden data ----------------
    input_ids = torch.tensor(spec["input_ids"], dtype=torch.int64)
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
    assert logits.shape == (batch, tokens, cfg.vocab_size)
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
        assert captures[f"mlp_key.{L}"].shape == (batch, tokens, inter)
        assert captures[f"mlp_out.{L}"].shape == (batch, tokens, hidden)
        assert captures[f"block_out.{L}"].shape == (batch, tokens, hidden)
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
    manual_extra = key0 @ delta_out_in.t()  # (batch,tokens,hidden)
    if spec["conv1d"]:
        ref_extra = key0 @ delta  # Conv1D: x @ W
    else:
        ref_extra = torch.nn.functional.linear(key0, delta)
    assert torch.allclose(manual_extra, ref_extra, atol=1e-5)

    if arch == "gemma3":
        verify_gemma3(model, golden)

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
| `input_ids` | int64 | (2, T) | fixed token ids, two different rows, no padding; positions are 0..T-1, no attention mask. T = 7 (gemma3: T = 9, the same first 7 ids plus two, so that its sliding window of 4 cuts off keys at positions 4..8) |
| `logits` | f32 | (2, T, 97) | model logits for `input_ids` |
| `embed_out` | f32 | (2, T, H) | extra: `hidden_states[0]` (token embeddings; gpt2 = wte + wpe; gemma3 = embedding * sqrt(H)) |
| `final_norm_out` | f32 | (2, T, H) | extra: `hidden_states[-1]`, i.e. last block output after the final norm (llama/gemma3 `model.norm`, gpt2/gptj `ln_f`) |
| `mlp_key.L` | f32 | (2, T, I) | input of the MLP down projection of layer L (llama/gemma3 `mlp.down_proj`, gpt2 `mlp.c_proj`, gptj `mlp.fc_out`), i.e. after the activation (llama: `silu(gate) * up`; gemma3: `gelu_tanh(gate) * up`) |
| `mlp_out.L` | f32 | (2, T, H) | output of the whole `mlp` module of layer L (down projection incl. bias; gemma3: the `down_proj` output, **before** `post_feedforward_layernorm`) |
| `block_out.L` | f32 | (2, T, H) | output hidden state of decoder layer L (before the final norm, also for the last layer) |
| `added_vector` | f32 | (H,) | random vector, std 1.0 |
| `added_at` | int64 | (3,) | `[layer, batch_row, position]` = `[1, 0, 3]` where `added_vector` is added |
| `logits_added` | f32 | (2, T, 97) | logits when `added_vector` is added to the output of layer-1 `mlp` at batch row 0, position 3 only (gemma3: to the `down_proj` output, so it then goes through `post_feedforward_layernorm`) |
| `delta` | f32 | HF orientation | random update (std 0.2) of the layer-0 down-projection weight, in the HF module's own `weight` orientation: llama/gemma3 `(H, I)` = (out, in); gptj `(H, I)` = (out, in); gpt2 Conv1D `(I, H)` = (in, out) |
| `delta_out_in` | f32 | (H, I) | the same delta in (out_features, in_features) orientation (gpt2: `delta.T`; llama/gptj/gemma3: identical to `delta`) |
| `logits_delta` | f32 | (2, T, 97) | logits with layer-0 down-projection weight `W + delta` (everything else unchanged) |

H = hidden size = 32. I = intermediate size: llama 64, gpt2 128 (4*H), gptj 128 (4*H), gemma3 64.
Layers L = 0, 1 (gemma3: 0..3).
"""


NOTES = """\
- Causal attention, no mask/padding, positions 0..T-1, scores scaled by 1/sqrt(head_dim), softmax in f32
  (gemma3: scale `query_pre_attn_scalar^-0.5`, and a sliding window on some layers; see below).
- Activations as configured: llama `silu`; gpt2/gptj `gelu_new`; gemma3 `gelu_pytorch_tanh` (torch's
  `gelu(x, approximate="tanh")`, the same formula as `gelu_new`):
  `gelu_new(x) = 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3)))`.
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
- **gemma3** (`Gemma3ForCausalLM`, text only, `model_type` `gemma3_text`; shaped like google/gemma-3-270m
  in miniature): hidden 32, intermediate 64, 4 layers, 4 query heads / **1** kv head (all query heads share
  it), **head_dim 16**, so `q_proj` 32→64 `(64, 32)`, `k_proj`/`v_proj` 32→16 `(16, 32)`, `o_proj` 64→32
  `(32, 64)`: heads*head_dim (64) != hidden (32) on purpose. Vocab 97, no biases, input rows of T = 9.
  - RMSNorm (every norm, including `q_norm`/`k_norm`) is `x * rsqrt(mean(x^2) + eps) * (1 + w)` with
    eps 1e-6, computed in f32: the stored weight is `w`, not the scale (here `w` = 0.1*N(0,1); 0 = identity).
  - Embeddings: `embed_out = E[ids] * sqrt(H)`. The scale is a **float32** buffer `torch.tensor(sqrt(H))`
    (here f32(sqrt(32)) = 5.6568542), cast to the weight dtype and multiplied in that dtype: exact in f32
    (checked bit-for-bit); with bf16 weights transformers rounds the scale to bf16 first (e.g. sqrt(640) =
    25.298 becomes 25.25).
  - Decoder layer ("sandwich" norms): `h = x + post_attention_layernorm(attn(input_layernorm(x)))`, then
    `block_out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))`;
    `mlp(x) = down_proj(gelu_tanh(gate_proj(x)) * up_proj(x))`. `mlp_out.L` is the `down_proj` output,
    **before** `post_feedforward_layernorm`.
  - Attention: q/k are split into heads of 16, then `q_norm`/`k_norm` (weight shape (16,), shared by all
    heads) normalise each head's 16 dims **before** rotary; v is not normalised. RoPE in "rotate_half"
    layout (pairs `(i, i + 8)`) over the whole head, `inv_freq[j] = theta^(-2j/16)`, theta = 1e6 on
    full-attention layers, 10000 on sliding layers. config.json stores them as
    `rope_parameters.full_attention.rope_theta` and `rope_parameters.sliding_attention.rope_theta`; hub
    configs (e.g. google/gemma-3-270m) have top-level `rope_theta` (full) and `rope_local_base_freq`
    (sliding) instead. No rope scaling. Scores are scaled by `query_pre_attn_scalar^-0.5` with
    `query_pre_attn_scalar` = 16 = head_dim here (real 270m: 256, also its head_dim), i.e. 0.25: the fixture
    cannot tell it from `head_dim^-0.5`, so read `query_pre_attn_scalar`. No softcapping
    (`attn_logit_softcapping` and `final_logit_softcapping` are null).
  - Sliding window: `layer_types` = [sliding, full, sliding, full] (layers 0 and 2 sliding, 1 and 3 full) is
    authoritative; `_sliding_window_pattern` (2 here, 6 in google/gemma-3-270m; older hub configs spell it
    `sliding_window_pattern`) is a legacy int that transformers uses only when `layer_types` is absent (layer i
    is full iff (i+1) % pattern == 0). On a sliding layer query i sees
    key j **iff `i - sliding_window < j <= i`**, i.e. itself and the previous `sliding_window - 1` = 3 tokens
    (at most 4 keys); full layers see all `j <= i`. `sliding_window` = 4, so queries 4..8 lose keys. Verified
    in transformers 5.23.0 `masking_utils.py` (`sliding_window_overlay`: `kv_idx > q_idx - sliding_window`,
    AND-ed with causal `kv_idx <= q_idx`) and empirically: the eager attention probabilities are exactly
    zero outside that band, and a float64 re-implementation with window 3, 5 or none differs from `logits`
    by 2.8 to 4.6.
  - Final `model.norm` (also `(1 + w)`), then logits = `final_norm_out @ E^T` with the **unscaled** embedding
    matrix (tied: model.safetensors has no `lm_head.weight`).
- An independent plain-torch re-implementation matched `logits`, `mlp_key.*`, `mlp_out.*`, `block_out.*`,
  `logits_added`, `logits_delta` to <= 4e-6 max abs error; logits have std ~1.1, so a tolerance of ~1e-4
  is comfortable for the Rust tests. For gemma3 the generator itself checks a float64 re-implementation
  (`_gemma3_reference` in ci/make_fixtures.py) on every run: <= 4.3e-6 max abs error over all golden tensors
  (logits std ~1.2).
"""


def write_readme(results):
    tv, trv, sv = torch.__version__, transformers.__version__, safetensors.__version__
    parts = []
    parts.append("# Golden fixtures for editguard model implementations\n")
    parts.append(
        "Tiny random-weight Hugging Face causal LMs (`llama`, `gpt2`, `gptj`, `gemma3`) plus reference outputs\n"
        "computed with PyTorch/transformers, so the Rust re-implementations can be tested without Python.\n"
        "All weights are float32; every parameter was re-initialised with non-trivial random values\n"
        "(matrices/embeddings N(0, 0.2^2), norm weights 1 + 0.1*N(0,1), biases 0.1*N(0,1)) so a mistake in\n"
        "any parameter shows up in the logits. gemma3's norm weights are 0.1*N(0,1) instead: Gemma's RMSNorm\n"
        "computes `x_norm * (1 + w)`, so its effective scale `1 + w` is again ~1 + 0.1*N(0,1).\n"
        "Attention implementation: eager. No padding, no attention mask.\n"
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
        "gemma3 ties `lm_head.weight` to `model.embed_tokens.weight` (the unscaled matrix); its model.safetensors\n"
        "contains no `lm_head.weight` either.\n"
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
    for arch in ("llama", "gpt2", "gptj", "gemma3"):
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
