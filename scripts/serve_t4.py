"""Generate with an export (`python -m hanuman_jax.export`) in PyTorch, as on a T4: float16 weights
through transformers, on CUDA when there is a GPU and on the CPU otherwise.

python scripts/serve_t4.py --model OUT --prompt "สวัสดี" [--max-new-tokens N] [--temperature T]
    [--top-k K] [--top-p P] [--chat] [--dtype float16|float32]

`--chat` makes the prompt a user turn with the export's chat template (`apply_chat_template`, the
ids of `Tokenizer.encode_chat` and of `generate --chat`); generation stops at <eos> or <sep>
(generation_config.json).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/serve_t4.py")
    parser.add_argument("--model", required=True, help="a directory written by hanuman_jax.export")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--chat", action="store_true", help="the prompt is a user turn")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    args = parser.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # transformers before 4.56 calls the argument torch_dtype
    old = tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (4, 56)
    dtype = {"torch_dtype" if old else "dtype": getattr(torch, args.dtype)}
    model = AutoModelForCausalLM.from_pretrained(args.model, **dtype)
    model.to(device).eval()
    sampling = {"do_sample": False}
    if args.temperature > 0:
        sampling = {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k,
                    "top_p": args.top_p}  # fmt: skip
    for prompt in args.prompt:
        if args.chat:
            turn = [{"role": "user", "content": prompt}]
            ids = tokenizer.apply_chat_template(turn, add_generation_prompt=True, return_dict=False)
        else:
            ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids], device=device), max_new_tokens=args.max_new_tokens, **sampling
            )
        text = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)  # a reply's text
        if not args.chat:
            # a text's continuation, decoded alone, would lose the space it starts with (the
            # decoder takes it for the one encoding puts before a line's first word or text):
            # it is the whole text less the prompt's (as `Tokenizer.decode_after`)
            head = tokenizer.decode(ids, skip_special_tokens=True)
            whole = tokenizer.decode(out[0], skip_special_tokens=True)
            if whole.startswith(head):
                text = whole[len(head) :]
        print(f"--- {prompt} ({device}, {args.dtype})\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
