# Throwaway: print what HF CLIPTokenizerFast returns for the long prompts used in the Rust tests,
# and the text of the dropped tokens as diffusers' truncation warning decodes it.
# usage: python hf_long_prompt.py tests/data/hf_long_prompts.json
import json, sys
from transformers import CLIPTokenizerFast
root = "/work/shared/fixtures/tiny"
prompts = [
    " ".join(f"word{i} hanbok!" for i in range(40)),
    "a photograph of an astronaut riding a horse " * 12 + "!!! the end",
    "Joseon dynasty palace, dancheong, gayageum " * 10,
]
out, cut = {}, {}
for sub in ("sdxl/tokenizer", "sdxl/tokenizer_2", "clip"):
    t = CLIPTokenizerFast.from_pretrained(f"{root}/{sub}")
    out[sub] = t(prompts, truncation=True, padding="max_length", max_length=77).input_ids
    full = t(prompts).input_ids
    # What diffusers prints as truncated: batch_decode of the ids past the window, EOS excluded.
    cut[sub] = [t.decode(f[t.model_max_length - 1 : -1]) for f in full]
    print(sub, [len(f) for f in full], t.pad_token_id, file=sys.stderr)
json.dump(dict(prompts=prompts, ids=out, cut=cut), open(sys.argv[1], "w"))
