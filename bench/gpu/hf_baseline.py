"""HF transformers fp16 baseline for bench/gpu/run.sh, same card, same run: the code of
../shared/tools/hf_oracle.py's GPU anchors (Blip2ForConditionalGeneration.generate, fp16, random
weights of the real blip2-opt-2.7b shapes, prompt 45 = 32 image + BOS + 12 text tokens, 32 new
tokens forced, greedy), at the batch sizes of the issue, plus vision+Q-Former+projection at batch 1
and 64, one request with 16 new tokens, and beam search (5 beams, 32 tokens forced) at batch 1, 8
and 32 (HF_BEAM_BATCHES). Needs torch + transformers (on the GPU machine only). Writes
$OUT/hf_baseline.json."""
import json, os, sys, time
import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration

OUT = os.environ.get("OUT", ".")
BATCHES = [int(b) for b in os.environ.get("HF_BATCHES", "1,8,32,64,256").split(",")]
GEN = 32
BEAMS = 5
BEAM_BATCHES = [int(b) for b in os.environ.get("HF_BEAM_BATCHES", "1,8,32").split(",")]


def cuda_time(fn, reps=3, warm=1):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]


full = Blip2Config(
    vision_config=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                       image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True),
    qformer_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        cross_attention_frequency=2, encoder_hidden_size=1408),
    text_config=dict(model_type="opt", vocab_size=50304, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                     num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560,
                     bos_token_id=2, eos_token_id=50118, pad_token_id=1),
    num_query_tokens=32, image_token_index=50265)
torch.set_default_dtype(torch.float16)
with torch.device("cuda"):
    big = Blip2ForConditionalGeneration(full).eval()
torch.set_default_dtype(torch.float32)
ids = [50265] * 32 + [2] + list(range(100, 112))
res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "prompt_len": len(ids), "new_tokens": GEN,
       "generate": {}, "generate_beams": {}, "encode_ms": {}}


def encode(pv, bs):
    return big.language_projection(big.qformer(query_embeds=big.query_tokens.expand(bs, -1, -1),
                                               encoder_hidden_states=big.vision_model(pixel_values=pv).last_hidden_state).last_hidden_state)


with torch.no_grad():
    for bs in [1, 64]:
        pv = torch.randn(bs, 3, 224, 224, dtype=torch.float16, device="cuda")
        res["encode_ms"][bs] = cuda_time(lambda: encode(pv, bs))
        print("HF encode", bs, res["encode_ms"][bs], flush=True)
    for bs in BATCHES:
        try:
            pv = torch.randn(bs, 3, 224, 224, dtype=torch.float16, device="cuda")
            x = torch.tensor([ids] * bs, device="cuda")
            ms = cuda_time(lambda: big.generate(pixel_values=pv, input_ids=x, attention_mask=torch.ones_like(x),
                                                max_new_tokens=GEN, min_new_tokens=GEN, do_sample=False))
            res["generate"][bs] = {"ms": ms, "requests_per_s": bs / ms * 1e3, "gen_tokens_per_s": bs * GEN / ms * 1e3}
        except Exception as e:  # e.g. out of memory at 256
            res["generate"][bs] = {"error": repr(e)[:300]}
        print("HF generate", bs, res["generate"][bs], flush=True)
    for bs in BEAM_BATCHES:
        try:
            pv = torch.randn(bs, 3, 224, 224, dtype=torch.float16, device="cuda")
            x = torch.tensor([ids] * bs, device="cuda")
            ms = cuda_time(lambda: big.generate(pixel_values=pv, input_ids=x, attention_mask=torch.ones_like(x),
                                                max_new_tokens=GEN, min_new_tokens=GEN, do_sample=False, num_beams=BEAMS))
            res["generate_beams"][bs] = {"num_beams": BEAMS, "ms": ms, "requests_per_s": bs / ms * 1e3,
                                         "gen_tokens_per_s": bs * GEN / ms * 1e3}
        except Exception as e:
            res["generate_beams"][bs] = {"error": repr(e)[:300]}
        print("HF generate, %d beams" % BEAMS, bs, res["generate_beams"][bs], flush=True)
    pv = torch.randn(1, 3, 224, 224, dtype=torch.float16, device="cuda")
    x = torch.tensor([ids], device="cuda")
    res["request_16_tokens_ms"] = cuda_time(lambda: big.generate(pixel_values=pv, input_ids=x, attention_mask=torch.ones_like(x),
                                                                 max_new_tokens=16, min_new_tokens=16, do_sample=False))
json.dump(res, open(os.path.join(OUT, "hf_baseline.json"), "w"), indent=1)
print(json.dumps(res))
