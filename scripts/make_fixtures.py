#!/usr/bin/env python3
"""Make the HF reference fixtures that yalis's engine tests compare against.

Run where PyTorch and transformers 5.x are installed (a GPU node's python3 has them):

    python3 scripts/make_fixtures.py OUT_DIR

For each small random Llama checkpoint it writes, under OUT_DIR/<name>/:
  config.json, model*.safetensors (+ index when sharded), tokenizer.json  -- an HF checkpoint
  reference.json         prompts, their input ids, greedy ids, top-2 margins, versions
  reference.safetensors  `logits` float32 [num_prompts, max_new_tokens, vocab]: the logits each
                         greedy token was chosen from (full forward over the whole sequence, f32,
                         CPU, eager attention, so there is no KV-cache or TF32 in the reference)

Checkpoints:
  gqa-llama3   GQA (4 heads, 2 KV heads), rope_type llama3, eos as a list, bf16 on disk,
               sharded (model.safetensors.index.json), tokenizer adds BOS itself.
  tied-odd     tied embeddings, sizes that are not powers of two (hidden 72, head_dim 18,
               intermediate 200, vocab 333), default rope, f32 on disk, single file, tokenizer
               without a post-processor (the engine must add BOS).
The weights are re-drawn at a scale that gives logits a spread of a few units, so greedy
choices have clear margins.
"""
import json
import math
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM

TEXT = """The quick brown fox jumps over the lazy dog. Large language models are served on many GPUs.
Tensor parallelism splits each layer across devices; pipeline parallelism splits the layers.
Every decode step reads all weights once, so memory bandwidth sets its floor, and the all-reduce
of every layer adds latency that grows with the number of devices. Once upon a time, in a land
far away, there lived a researcher who measured everything twice and trusted nothing once.
Hello world! Numbers like 12345 and 3.14159 appear too, as do symbols: (a+b)*c = d / e."""

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away, there lived a researcher who",
    "Hello",
]
MAX_NEW_TOKENS = 8


def make_tokenizer(vocab_size, add_bos_post_processor):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT.split("\n") * 4, trainer)
    if add_bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", 0)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tok.token_to_id("<|begin_of_text|>") == 0
    assert tok.get_vocab_size() <= vocab_size
    return tok


def make_config(spec):
    kw = dict(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        head_dim=spec["hidden"] // spec["heads"],
        max_position_embeddings=spec["max_pos"],
        rms_norm_eps=spec["eps"],
        tie_word_embeddings=spec["tied"],
        bos_token_id=0,
        eos_token_id=spec["eos"],
        attention_bias=False,
        mlp_bias=False,
    )
    rope = dict(spec["rope"])
    try:  # transformers 5: rope_parameters carries rope_theta
        cfg = LlamaConfig(rope_parameters=rope, **kw)
    except TypeError:
        theta = rope.pop("rope_theta")
        cfg = LlamaConfig(rope_theta=theta, rope_scaling=rope if rope["rope_type"] != "default" else None, **kw)
    return cfg


def redraw(model, spec, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.15 if spec["tied"] else 1.0))
            elif p.dim() == 2:  # Linear [out, in]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            else:
                raise RuntimeError(f"unexpected parameter {name}")
        if not spec["tied"]:
            model.lm_head.weight.mul_(3.0)


def greedy_reference(model, input_ids):
    ids = list(input_ids)
    gen, logits, margins = [], [], []
    with torch.no_grad():
        for _ in range(MAX_NEW_TOKENS):
            out = model(torch.tensor([ids])).logits[0, -1].float()
            top2 = torch.topk(out, 2).values
            tok = int(torch.argmax(out))
            gen.append(tok)
            logits.append(out.clone())
            margins.append(float(top2[0] - top2[1]))
            ids.append(tok)
    return gen, torch.stack(logits), margins


def build(name, spec, out_dir):
    torch.manual_seed(spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"])
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    tok = make_tokenizer(spec["tok_vocab"], spec["bos_post"])
    tok.save(os.path.join(d, "tokenizer.json"))

    cfg = make_config(spec)
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "eager"
    redraw(model, spec, gen)
    # The reference uses the weights exactly as stored on disk. Casting the module also casts
    # the RoPE inv_freq buffer, which would round the reference's frequencies to bf16 (an error
    # that grows with position, not part of the checkpoint): restore the f32 frequencies.
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.clone()
    model = model.to(spec["dtype"]).to(torch.float32).eval()
    rotary.inv_freq = inv_freq
    if hasattr(rotary, "original_inv_freq"):
        rotary.original_inv_freq = inv_freq
    input_ids = []
    for p in PROMPTS:
        ids = tok.encode(p).ids
        if not spec["bos_post"]:
            ids = [0] + ids
        input_ids.append(ids)
    gens, logits, margins = [], [], []
    for ids in input_ids:
        g, l, m = greedy_reference(model, ids)
        gens.append(g)
        logits.append(l)
        margins.append(m)
    assert torch.equal(rotary.inv_freq, inv_freq) and rotary.inv_freq.dtype == torch.float32
    save_file({"logits": torch.stack(logits).contiguous()}, os.path.join(d, "reference.safetensors"))
    model.to(spec["dtype"]).save_pretrained(d, max_shard_size=spec["shard"])
    ref = {
        "prompts": PROMPTS,
        "input_ids": input_ids,
        "greedy_ids": gens,
        "top2_margins": margins,
        "max_new_tokens": MAX_NEW_TOKENS,
        "decoded": [tok.decode(g) for g in gens],
        "made_by": "scripts/make_fixtures.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "spec": {k: (str(v) if k == "dtype" else v) for k, v in spec.items()},
    }
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    print(name, "files:", sorted(os.listdir(d)))
    print(name, "config:", open(os.path.join(d, "config.json")).read())
    print(name, "min margin:", min(min(m) for m in margins), "greedy:", gens)


SPECS = {
    "gqa-llama3": dict(
        seed=1234, vocab=384, tok_vocab=384, hidden=64, intermediate=160, layers=3, heads=4,
        kv_heads=2, max_pos=256, eps=1e-5, tied=False, eos=[1, 2], bos_post=True,
        rope=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                  high_freq_factor=4.0, original_max_position_embeddings=32),
        dtype=torch.bfloat16, shard="150KB",
    ),
    "tied-odd": dict(
        seed=4321, vocab=333, tok_vocab=300, hidden=72, intermediate=200, layers=2, heads=4,
        kv_heads=4, max_pos=128, eps=1e-6, tied=True, eos=1, bos_post=False,
        rope=dict(rope_type="default", rope_theta=10000.0),
        dtype=torch.float32, shard="10GB",
    ),
}

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"
    for name, spec in SPECS.items():
        build(name, spec, out)
