"""Goldens for decoding edge cases that the shared fixtures never reach: eos inside greedy and
beam search (with length_penalty, early_stopping, num_return_sequences), min_new_tokens and
repetition_penalty (greedy and beams). Made with HF transformers on the CPU from the shared tiny
fixtures; the random tiny models never emit eos 50118, so eos is set to a token they do emit.

Not used by the build or CI (they read decoding.json). To remake it, in a virtualenv outside the
repository with torch, transformers and safetensors installed:
    python make_decoding_goldens.py ../../../shared > decoding.json
"""
import json, sys

import torch
from safetensors.torch import load_file
from transformers import Blip2ForConditionalGeneration

SHARED = sys.argv[1]
FIX = SHARED + "/fixtures"
manifest = json.load(open(FIX + "/MANIFEST.json"))
pixels = load_file(FIX + "/pixel_values.safetensors")

# (model, case, eos) where eos is a token the greedy path emits early
PICKS = [("tiny-f16", 1, 3421), ("tiny-f32-sharded", 0, 41841), ("tiny-f32-sharded", 2, 41841)]
VARIANTS = [
    {"name": "greedy_eos"},
    {"name": "greedy_eos_min5", "min_new_tokens": 5},
    {"name": "greedy_reppen", "repetition_penalty": 1.5, "eos": 50118},
    {"name": "beam3_eos", "num_beams": 3},
    {"name": "beam3_eos_lp0.5", "num_beams": 3, "length_penalty": 0.5},
    {"name": "beam3_eos_lp2", "num_beams": 3, "length_penalty": 2.0},
    {"name": "beam3_eos_early", "num_beams": 3, "early_stopping": True},
    {"name": "beam4_eos_ret3", "num_beams": 4, "num_return_sequences": 3},
    {"name": "beam3_eos_min5", "num_beams": 3, "min_new_tokens": 5},
    {"name": "beam3_reppen", "num_beams": 3, "repetition_penalty": 1.5},
    {"name": "beam3_reppen_noeos", "num_beams": 3, "repetition_penalty": 1.3, "eos": 50118},
]

out = {"transformers": __import__("transformers").__version__, "torch": torch.__version__, "cases": []}
models = {}
for name, case_no, eos in PICKS:
    if name not in models:
        m = Blip2ForConditionalGeneration.from_pretrained(FIX + "/" + name, torch_dtype=torch.float32)
        models[name] = m.eval()
    model = models[name]
    case = manifest["fixtures"][name]["cases"][case_no]
    key = case["image"].split("/")[-1].rsplit(".", 1)[0]
    pv = pixels[key].unsqueeze(0)
    ids = torch.tensor([case["input_ids"]])
    for v in VARIANTS:
        e = v.get("eos", eos)
        kw = dict(max_new_tokens=12, do_sample=False, num_beams=v.get("num_beams", 1), eos_token_id=e, pad_token_id=1,
                  min_new_tokens=v.get("min_new_tokens", 0), repetition_penalty=v.get("repetition_penalty", 1.0),
                  length_penalty=v.get("length_penalty", 1.0), early_stopping=v.get("early_stopping", False),
                  num_return_sequences=v.get("num_return_sequences", 1), return_dict_in_generate=True, output_scores=True)
        with torch.no_grad():
            g = model.generate(pixel_values=pv, input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        seqs = []
        for s in g.sequences.tolist():
            new = s[ids.shape[1]:]
            while new and new[-1] == 1 and e != 1:  # padding after eos
                new.pop()
            seqs.append(new)
        scores = g.sequences_scores.tolist() if getattr(g, "sequences_scores", None) is not None else None
        out["cases"].append({"model": name, "case": case_no, "variant": v["name"], "eos": e, "params": kw | {"eos_token_id": e},
                             "new_ids": seqs, "scores": scores})
        print(name, case_no, v["name"], seqs, scores, file=sys.stderr)
json.dump(out, sys.stdout, indent=1)
