"""Greedy tokens from optimum's ORTModelForCausalLM, run inside the optimum venv.

optimum pins transformers below 4.58 and so cannot share the project's test venv; the test runs
this script there with a JSON request on stdin (``{"model": folder, "prompts": [[ids...]],
"max_new_tokens": n}``) and reads one JSON line from stdout: for each of ``io_binding`` and
``no_io_binding``, the new tokens of each prompt run alone, and (``..._batched``) of all prompts
run as one left-padded batch, the way HF's generate pads.
"""

import json
import sys

import torch
from optimum.onnxruntime import ORTModelForCausalLM


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def main() -> None:
    request = json.load(sys.stdin)
    prompts, new_tokens = request["prompts"], request["max_new_tokens"]
    result = {}
    for key, io_binding in (("no_io_binding", False), ("io_binding", True)):
        model = ORTModelForCausalLM.from_pretrained(request["model"], use_io_binding=io_binding)
        pad = model.config.pad_token_id
        tokens = []
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
            )
            tokens.append(out[0, len(prompt) :].tolist())
        result[key] = tokens
        ids, mask = left_padded(prompts, pad)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        result[f"{key}_batched"] = out[:, ids.shape[1] :].tolist()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
