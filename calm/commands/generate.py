"""`calm generate`: load a trained run and stream a continuation of a prompt."""

from __future__ import annotations

import argparse
import sys

HELP = "Generate text with a trained composition, streaming tokens as they come."


class TextStreamer:
    """`put(tokens)` / `end()` for `CALM.generate`: prints the newly decoded text of row 0."""

    def __init__(self, tokenizer, stream=None) -> None:
        self.tokenizer = tokenizer
        self.stream = stream or sys.stdout  # looked up now: sys.stdout may have been replaced
        self.ids: list[int] = []
        self.printed = ""

    def put(self, tokens) -> None:
        self.ids.append(int(tokens.reshape(-1)[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.printed):
            self.stream.write(text[len(self.printed) :])
            self.stream.flush()
            self.printed = text

    def end(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="Run directory written by `calm train`.")
    parser.add_argument("--prompt", required=True, help="Text to continue.")
    parser.add_argument("--checkpoint", default="last", help="last, best, or a checkpoint path.")
    parser.add_argument("--anchor", help="Override the anchor's recorded path.")
    parser.add_argument("--augment", action="append", help="Override augmenting paths (repeat).")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="Tokens to generate.")
    parser.add_argument("--do-sample", action="store_true", help="Sample instead of greedy.")
    parser.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature.")
    parser.add_argument("--top-k", type=int, help="Sample from the k most likely tokens.")
    parser.add_argument("--top-p", type=float, help="Nucleus sampling mass.")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed.")


def run(args: argparse.Namespace) -> int:
    import torch

    from calm.run import load_run

    loaded = load_run(args.run_dir, args.checkpoint, args.anchor, args.augment)
    model, tokenizer = loaded.model, loaded.tokenizer
    if model.tokenizers is not None:
        inputs = dict(model.tokenizers([args.prompt]))
    else:
        inputs = {"input_ids": torch.tensor([tokenizer(args.prompt)["input_ids"]])}
    sys.stdout.write(args.prompt)
    model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        generator=torch.Generator().manual_seed(args.seed),
        streamer=TextStreamer(tokenizer),
    )
    return 0
