#!/usr/bin/env python3
"""PyTorch/transformers side of editguard's side-by-side perplexity benchmark.

What it measures
----------------
Loads a GGUF model with transformers' GGUF loader (tokenizer converted from the
GGUF metadata, weights de-quantized to float32), then computes the perplexity of
a JSON corpus (a list of {"Text": ...} records, e.g. ME-PPL_50.json) exactly as
the reference files in ../shared/reference were computed:

  * float32 forward, in batches of --batch sentences in corpus order, right-padded
    with the tokenizer's pad token, with an attention mask;
  * float64 log-softmax of each sentence's logits, NLL of every scored token;
  * --bos off (the Butterfly-paper convention): no BOS (add_special_tokens=False),
    sentence tokens 2..n scored;  --bos on: the BOS id is prepended to every
    sentence and every sentence token is scored;
  * per-sentence ppl = exp(mean NLL); mean_sentence_ppl = arithmetic mean over
    sentences; corpus_ppl = exp(total NLL / total scored tokens).

Timed: the load (tokenizer + model, "load_seconds") and each full perplexity pass
over the corpus (forward passes + float64 NLL; tokenisation is done once before
and not timed), repeated --repeats times: "seconds" is the best pass,
"all_seconds" all of them, "tokens_per_second" = tokens / best, where "tokens"
counts every input token including a prepended BOS.  "peak_rss_mib" is the
process's peak resident memory (getrusage ru_maxrss), load included;
"load_peak_rss_mib" the same read right after the load.

The model's config is checked against the GGUF metadata before anything is
computed (layer count, widths, heads, head_dim, sliding window, rope bases, and
for gemma3 the two values the loader does not map -- query_pre_attn_scalar and
layer_types -- against llama.cpp's rules for that architecture); a mismatch is a
hard error.  --verbose prints the checked values and the whole config to stderr.
The attention implementation is transformers' default for the model on CPU
("sdpa" for llama and gemma3 with transformers 5.23) unless --attn says otherwise;
it is reported as "attn_implementation".

How it is called
----------------
    PYTHON ci/pytorch_ppl.py --gguf PATH --corpus PATH/ME-PPL_50.json \\
        --bos on|off --threads 2 --batch 10 --repeats 2 --json \\
        [--check-reference ../shared/reference/X.me-ppl-50.json [--convention bos|no_bos]] \\
        [--verbose] [--attn default|sdpa|eager]

With --json one JSON object is printed on stdout (all diagnostics go to stderr);
without it, a short table.  With --check-reference the script exits with status 1
if the mean sentence perplexity differs from the reference's by more than 1e-3
relative (the corpus perplexity, token ids and per-sentence NLLs are compared
and reported too; a difference there is a warning).  --convention defaults to the
one --bos selects and must agree with it.  Other exit codes: 2 bad arguments or
inputs, 3 the loaded config does not match the GGUF.

Written against (and run with) Python 3.11, torch 2.15.0 (CPU), transformers
5.23.0, tokenizers 0.23.3, gguf 0.19.0, accelerate 1.16.0.
"""

import argparse
import json
import math
import os
import resource
import sys
import time

VERBOSE = "--verbose" in sys.argv
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not VERBOSE:
    # the GGUF loader's de-quantisation progress bar uses tqdm.auto directly
    os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

REL_TOL = 1e-3


def die(msg, code=2):
    print(f"pytorch_ppl: error: {msg}", file=sys.stderr)
    sys.exit(code)


def warn(msg):
    print(f"pytorch_ppl: warning: {msg}", file=sys.stderr)


def note(msg):
    if VERBOSE:
        print(f"pytorch_ppl: {msg}", file=sys.stderr)


def rel_diff(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def peak_rss_mib():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


# ---------------------------------------------------------------- config check


def gguf_metadata(path):
    """(architecture, {key without the architecture prefix: value}, tensor names)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[-1] in (
            "tokens",
            "scores",
            "token_type",
            "merges",
        ):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001 - unusual field types are not needed
            pass
    arch = meta.get("general.architecture")
    if arch is None:
        die(f"{path}: no general.architecture in the GGUF metadata")
    prefix = arch + "."
    arch_meta = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
    names = [t.name for t in reader.tensors]
    return arch, arch_meta, names


def rope_theta_of(config, layer_type=None):
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict):
        if layer_type is not None and isinstance(rp.get(layer_type), dict):
            rp = rp[layer_type]
        if "rope_theta" in rp:
            return rp["rope_theta"], rp.get("rope_type"), rp.get("factor")
    return getattr(config, "rope_theta", None), None, None


def check_config(config, gguf_path):
    """Compare the loaded config with the GGUF metadata; returns (rows, problems)."""
    arch, g, tensor_names = gguf_metadata(gguf_path)
    rows = []  # (name, config value, expected, ok)

    def cmp(name, have, want, rel=None):
        if want is None:
            return
        if rel is not None:
            ok = have is not None and rel_diff(float(have), float(want)) <= rel
        else:
            ok = have == want
        rows.append((name, have, want, ok))

    direct = [
        ("block_count", "num_hidden_layers"),
        ("embedding_length", "hidden_size"),
        ("feed_forward_length", "intermediate_size"),
        ("attention.head_count", "num_attention_heads"),
        ("attention.head_count_kv", "num_key_value_heads"),
        ("attention.key_length", "head_dim"),
        ("attention.sliding_window", "sliding_window"),
        ("context_length", "max_position_embeddings"),
    ]
    for gkey, attr in direct:
        if gkey in g and hasattr(config, attr):
            cmp(attr, getattr(config, attr), int(g[gkey]))
    if "attention.layer_norm_rms_epsilon" in g:
        cmp("rms_norm_eps", getattr(config, "rms_norm_eps", None),
            float(g["attention.layer_norm_rms_epsilon"]), rel=1e-6)
    if "vocab_size" in g:
        cmp("vocab_size", config.vocab_size, int(g["vocab_size"]))
    cmp("tie_word_embeddings", bool(getattr(config, "tie_word_embeddings", False)),
        "output.weight" not in tensor_names)

    if arch == "gemma3":
        n_layers = int(g["block_count"])
        head_dim = int(g.get("attention.key_length", config.head_dim))
        # llama.cpp (src/llama-model.cpp, LLM_ARCH_GEMMA3): sliding-window pattern 6
        # (every 6th layer full attention), attention scale 1/sqrt(head_dim) except
        # for the 27B (1/sqrt(n_embd/n_head)), local rope base 10000.
        want_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                      for i in range(n_layers)]
        have_types = list(getattr(config, "layer_types", None) or [])
        rows.append(("layer_types (full at)",
                     [i for i, t in enumerate(have_types) if t == "full_attention"],
                     [i for i, t in enumerate(want_types) if t == "full_attention"],
                     have_types == want_types))
        if n_layers == 62:  # gemma-3-27b
            want_scalar = int(g["embedding_length"]) // int(g["attention.head_count"])
        else:
            want_scalar = head_dim
        cmp("query_pre_attn_scalar", getattr(config, "query_pre_attn_scalar", None),
            want_scalar)
        theta_full, type_full, factor_full = rope_theta_of(config, "full_attention")
        theta_local, _, _ = rope_theta_of(config, "sliding_attention")
        if "rope.freq_base" in g:
            cmp("rope_theta (full_attention)", theta_full, float(g["rope.freq_base"]),
                rel=1e-9)
        cmp("rope_theta (sliding_attention)", theta_local, 10000.0, rel=1e-9)
        if "rope.scaling.factor" in g:
            cmp("rope scaling factor (full_attention)", factor_full,
                float(g["rope.scaling.factor"]), rel=1e-9)
        else:
            cmp("rope_type (full_attention)", type_full or "default", "default")
    elif "rope.freq_base" in g:
        theta, _, _ = rope_theta_of(config)
        cmp("rope_theta", theta, float(g["rope.freq_base"]), rel=1e-9)

    problems = [r for r in rows if not r[3]]
    return arch, rows, problems


# ---------------------------------------------------------------- reference


def load_reference(path, convention, gguf_name):
    try:
        with open(path, encoding="utf-8") as f:
            ref = json.load(f)
    except (OSError, ValueError) as e:
        die(f"cannot read reference {path}: {e}")
    model = str(ref.get("model", ""))
    if gguf_name not in model:
        die(f"reference {path} is for model '{model.split(' ')[0]}', not {gguf_name}")
    if isinstance(ref.get(convention), dict):
        block = ref[convention]
    elif "mean_sentence_ppl" in ref:
        # single-convention file (smollm2's): its "convention" text says which
        text = str(ref.get("convention", "")).lower()
        held = "no_bos" if ("no bos" in text or "add_special_tokens=false" in text) else "bos"
        if held != convention:
            die(f"reference {path} holds only the {held} convention, not {convention}")
        block = ref
    else:
        held = [k for k in ("bos", "no_bos") if isinstance(ref.get(k), dict)]
        die(f"reference {path} has no {convention} convention (it holds: {held or 'none'})")
    for key in ("mean_sentence_ppl", "corpus_ppl"):
        if key not in block:
            die(f"reference {path} [{convention}] has no {key}")
    return block


def compare_reference(block, result, sentences, convention, path):
    out = {
        "path": path,
        "convention": convention,
        "mean_sentence_ppl": block["mean_sentence_ppl"],
        "corpus_ppl": block["corpus_ppl"],
        "mean_rel_diff": rel_diff(result["mean_sentence_ppl"], block["mean_sentence_ppl"]),
        "corpus_rel_diff": rel_diff(result["corpus_ppl"], block["corpus_ppl"]),
    }
    ref_sents = block.get("sentences")
    if isinstance(ref_sents, list):
        if len(ref_sents) != len(sentences):
            out["sentence_count_mismatch"] = [len(sentences), len(ref_sents)]
        else:
            id_mismatch = [i for i, (s, r) in enumerate(zip(sentences, ref_sents))
                           if "token_ids" in r and s["ids"] != r["token_ids"]]
            diffs = [rel_diff(s["nll"], r["nll_sum"]) for s, r in zip(sentences, ref_sents)
                     if "nll_sum" in r and r["nll_sum"] != 0]
            out["token_id_mismatches"] = id_mismatch
            out["max_sentence_nll_rel_diff"] = max(diffs) if diffs else None
    return out


# ---------------------------------------------------------------- perplexity


def perplexity_pass(model, batches, pad_id):
    """One full pass; returns the NLL sum of every sentence, in corpus order."""
    nlls = []
    with torch.inference_mode():
        for batch in batches:
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[row, : len(ids)] = 1
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            for row, ids in enumerate(batch):
                n = len(ids)
                # position t predicts token t+1; float64 log-softmax per sentence
                logp = torch.log_softmax(logits[row, : n - 1].to(torch.float64), dim=-1)
                target = input_ids[row, 1:n].unsqueeze(-1)
                nlls.append(float(-logp.gather(-1, target).sum()))
            del logits
    return nlls


def main():
    ap = argparse.ArgumentParser(
        description="ME-PPL perplexity of a GGUF model with PyTorch + transformers "
        "(the reference side of `editguard bench`).")
    ap.add_argument("--gguf", required=True, help="the model's .gguf file")
    ap.add_argument("--corpus", required=True, help="JSON list of {\"Text\": ...} records")
    ap.add_argument("--bos", choices=["on", "off"], default="off",
                    help="prepend BOS and score every sentence token (on), or the "
                    "Butterfly convention: no BOS, tokens 2..n scored (off; default)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--batch", type=int, default=10, help="sentences per forward (default 10)")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes (default 2)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--check-reference", metavar="PATH",
                    help="reference JSON; exit 1 unless its mean ppl is reproduced to 1e-3")
    ap.add_argument("--convention", choices=["bos", "no_bos"],
                    help="the reference's convention to compare (default: from --bos)")
    ap.add_argument("--attn", choices=["default", "sdpa", "eager"], default="default",
                    help="attention implementation (default: transformers' default)")
    ap.add_argument("--verbose", action="store_true",
                    help="print the config check, the config and progress to stderr")
    args = ap.parse_args()

    if args.threads < 1 or args.batch < 1 or args.repeats < 1:
        die("--threads, --batch and --repeats must be at least 1")
    bos = args.bos == "on"
    convention = args.convention or ("bos" if bos else "no_bos")
    if args.convention and (convention == "bos") != bos:
        die(f"--convention {convention} contradicts --bos {args.bos}")
    if not os.path.isfile(args.gguf):
        die(f"no such GGUF file: {args.gguf}")
    gguf_dir, gguf_name = os.path.split(os.path.abspath(args.gguf))
    try:
        with open(args.corpus, encoding="utf-8") as f:
            records = json.load(f)
        texts = [r["Text"] if isinstance(r, dict) else str(r) for r in records]
    except (OSError, ValueError, KeyError, TypeError) as e:
        die(f"cannot read corpus {args.corpus}: {e}")
    if not texts:
        die(f"corpus {args.corpus} is empty")
    ref_block = (load_reference(args.check_reference, convention, gguf_name)
                 if args.check_reference else None)

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)

    # ---- load (timed)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    t1 = time.perf_counter()
    kwargs = {"gguf_file": gguf_name, "dtype": torch.float32}
    if args.attn != "default":
        kwargs["attn_implementation"] = args.attn
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, **kwargs)
    model.eval()
    t2 = time.perf_counter()
    load_seconds = t2 - t0
    load_peak_rss = peak_rss_mib()
    attn_impl = model.config._attn_implementation
    note(f"loaded in {load_seconds:.2f} s (tokenizer {t1 - t0:.2f} s, model {t2 - t1:.2f} s); "
         f"{type(model).__name__}, dtype {model.dtype}, attn_implementation {attn_impl}")

    # ---- config vs GGUF
    arch, rows, problems = check_config(model.config, args.gguf)
    if VERBOSE:
        note(f"config check against the GGUF metadata (architecture {arch}):")
        for name, have, want, ok in rows:
            print(f"  {'ok  ' if ok else 'BAD '} {name:38} config={have!r}  gguf={want!r}",
                  file=sys.stderr)
        print(model.config.to_json_string(), file=sys.stderr)
    if problems:
        for name, have, want, _ in problems:
            print(f"pytorch_ppl: config mismatch: {name}: loaded {have!r}, GGUF implies {want!r}",
                  file=sys.stderr)
        die("the config transformers built from the GGUF does not match its metadata", 3)

    # ---- tokenise (untimed)
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else model.config.bos_token_id
    if bos and bos_id is None:
        die("--bos on, but the tokenizer has no BOS token")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = model.config.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
        warn(f"no pad token; padding with EOS ({pad_id}) (masked out anyway)")
    encoded = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if bos:
            ids = [bos_id] + ids
        if len(ids) < 2:
            die(f"sentence {i} has no token to score ({len(ids)} token(s))")
        encoded.append(ids)
    tokens = sum(len(ids) for ids in encoded)
    scored = sum(len(ids) - 1 for ids in encoded)
    batches = [encoded[i: i + args.batch] for i in range(0, len(encoded), args.batch)]
    note(f"{len(encoded)} sentences, {tokens} tokens ({scored} scored), "
         f"{len(batches)} batches of <= {args.batch}, pad id {pad_id}, bos {'on' if bos else 'off'}"
         f" (id {bos_id})")

    # ---- timed passes
    all_seconds = []
    nlls = None
    for rep in range(args.repeats):
        t = time.perf_counter()
        got = perplexity_pass(model, batches, pad_id)
        all_seconds.append(time.perf_counter() - t)
        note(f"pass {rep + 1}/{args.repeats}: {all_seconds[-1]:.3f} s")
        if nlls is None:
            nlls = got
        elif max(abs(a - b) for a, b in zip(nlls, got)) > 1e-6 * max(1.0, max(nlls)):
            warn("the NLLs of two passes differ (non-deterministic kernels?)")
    best = min(all_seconds)

    sentences = [{"ids": ids, "nll": nll, "scored": len(ids) - 1} for ids, nll in zip(encoded, nlls)]
    mean_ppl = sum(math.exp(s["nll"] / s["scored"]) for s in sentences) / len(sentences)
    corpus_ppl = math.exp(sum(nlls) / scored)

    result = {
        "implementation": f"pytorch {torch.__version__} + transformers {transformers.__version__}",
        "model": gguf_name,
        "bos": bos,
        "threads": args.threads,
        "batch": args.batch,
        "sentences": len(sentences),
        "tokens": tokens,
        "scored_tokens": scored,
        "seconds": best,
        "all_seconds": all_seconds,
        "tokens_per_second": tokens / best,
        "mean_sentence_ppl": mean_ppl,
        "corpus_ppl": corpus_ppl,
        "load_seconds": load_seconds,
        "peak_rss_mib": peak_rss_mib(),
        "load_peak_rss_mib": load_peak_rss,
        "attn_implementation": attn_impl,
        "torch_threads": torch.get_num_threads(),
    }
    failed = False
    if ref_block is not None:
        cmp = compare_reference(ref_block, result, sentences, convention, args.check_reference)
        result["reference"] = cmp
        failed = cmp["mean_rel_diff"] > REL_TOL
        if cmp["corpus_rel_diff"] > REL_TOL:
            warn(f"corpus ppl {corpus_ppl:.6f} vs reference {cmp['corpus_ppl']:.6f} "
                 f"(relative difference {cmp['corpus_rel_diff']:.2e})")
        if cmp.get("token_id_mismatches"):
            warn(f"token ids differ from the reference's in sentences {cmp['token_id_mismatches']}")
        if "sentence_count_mismatch" in cmp:
            warn(f"{cmp['sentence_count_mismatch'][0]} sentences, the reference has "
                 f"{cmp['sentence_count_mismatch'][1]}")
        result["reference"]["reproduced"] = not failed

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        ref = result.get("reference")
        rows = [
            ("implementation", result["implementation"] + f" ({attn_impl})"),
            ("model", f"{gguf_name}  (BOS {'on' if bos else 'off'}, {args.threads} threads, "
                      f"batch {args.batch})"),
            ("tokens", f"{tokens} ({scored} scored, {len(sentences)} sentences)"),
            ("mean ppl", f"{mean_ppl:.4f}" + (f"      (reference: {ref['mean_sentence_ppl']:.4f},"
                                              f" rel. diff {ref['mean_rel_diff']:.1e})" if ref else "")),
            ("corpus ppl", f"{corpus_ppl:.4f}" + (f"      (reference: {ref['corpus_ppl']:.4f},"
                                                  f" rel. diff {ref['corpus_rel_diff']:.1e})" if ref else "")),
            ("seconds", f"{best:.3f} best of " + ", ".join(f"{s:.3f}" for s in all_seconds)),
            ("tokens/s", f"{tokens / best:.1f}"),
            ("load", f"{load_seconds:.2f} s"),
            ("peak RSS", f"{result['peak_rss_mib']:.0f} MiB"),
        ]
        for k, v in rows:
            print(f"{k:16} {v}")

    if failed:
        die(f"mean sentence ppl {mean_ppl:.6f} does not reproduce the reference's "
            f"{ref_block['mean_sentence_ppl']:.6f} ({args.check_reference} [{convention}]) to "
            f"{REL_TOL:g} relative (difference {result['reference']['mean_rel_diff']:.2e})", 1)


if __name__ == "__main__":
    main()
