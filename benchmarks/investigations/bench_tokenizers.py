"""Measure what different tokenizers cost: TokenizerPair alignment, forward and generation overhead
against same-tokenizer composition, on random models with real tokenizers.

    python tools/hub_offline.py model smollm2-135m qwen2.5-coder-0.5b
    python -m benchmarks.investigations.bench_tokenizers [--batch 8] [--chars 2000] [--new 32]
                                                         [--repeats 5]
    python -m benchmarks.investigations.bench_tokenizers --real   # needs gemma3-270m converted

Anchor tokenizer: Qwen2.5 (151,936 entries); augmenting tokenizer: SmolLM2 (49,152 entries). The
same-tokenizer baseline gives the augmenting model Qwen's vocabulary and reads the same ids.
Both models are random Llamas of the given width and depth: the numbers are the overhead of the
alignment, not of real model sizes (bigger models make it relatively smaller).
With --real: Gemma-3-270M (anchor) composed with SmolLM2-135M (augmenting), greedy generation
speed of the anchor alone against the composition (blocks at their zero init).
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch
import transformers as T
from transformers import AutoTokenizer

from benchmarks.pair import StreamTimer
from calm import CALM, CALMConfig, hf
from calm.tokenizers import TokenizerPair
from tools.hub_offline import model_dir


def lm(vocab: int, width: int, layers: int, seed: int) -> T.LlamaForCausalLM:
    return hf.tiny_llama(
        vocab, width, layers, heads=8, kv_heads=4, intermediate_size=4 * width,
        max_positions=4096, seed=seed, pad_token_id=None,
    )  # fmt: skip


def timed(fns, repeats: int) -> list[float]:
    """Median seconds per call of each function, calls interleaved (the machine is shared, so
    its load drifts), after one warm-up call each."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def text_sync(pair: TokenizerPair, anchor_tokenizer, source: str, rows: int = 4) -> None:
    """Median time of one TextStream.append (4 rows, 32 steps) as the prompt text grows: the
    continuation is real text, so words end and augmenting tokens are committed."""
    for chars in (1000, 4000, 16000):
        prompts = [source[7 * i : 7 * i + chars] for i in range(rows)]
        conts = [source[7 * i + chars : 7 * i + chars + 600] for i in range(rows)]
        new = [anchor_tokenizer(c, add_special_tokens=False)["input_ids"][:32] for c in conts]
        stream = pair.stream(pair(prompts))
        times = []
        for j in range(32):
            start = time.perf_counter()
            stream.append([r[j] for r in new], [True] * rows)
            times.append(time.perf_counter() - start)
        print(
            f"text sync, prompts of {chars} chars x {rows} rows: "
            f"{statistics.median(times) * 1e3:.2f} ms/step (median), {max(times) * 1e3:.1f} max"
        )


def real_pair(args) -> None:
    gemma_dir, smol_dir = model_dir("gemma3-270m"), model_dir("smollm2-135m")
    pair = TokenizerPair(
        AutoTokenizer.from_pretrained(gemma_dir), AutoTokenizer.from_pretrained(smol_dir)
    )
    anchor = T.AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    aug = T.AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    model = CALM(anchor, aug, CALMConfig(), tokenizers=pair)
    prompts = ["The capital of France is", "def fibonacci(n):\n    "][: args.batch]
    batch = pair(prompts)
    kw = dict(max_new_tokens=args.new, eos_token_id=[], pad_token_id=0)

    def alone():
        with model.disable_composition():
            return model.generate(**batch, **kw)

    alone_s, composed_s = timed([alone, lambda: model.generate(**batch, **kw)], args.repeats)
    out = model.generate(**batch, **kw)
    assert torch.equal(out, alone()), "zero-init composition must generate as the anchor"
    rate = len(prompts) * args.new
    print(
        f"{model.num_trainable_parameters():,} composition parameters, "
        f"{len(model.connections)} connections; greedy, {len(prompts)} prompts x {args.new} "
        f"tokens: anchor alone {rate / alone_s:.1f} tok/s, composed {rate / composed_s:.1f} tok/s"
    )
    n = batch["input_ids"].shape[1]
    for row in pair.extend(batch, out[:, n:])["texts"]:
        print(repr(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--chars", type=int, default=2000)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--real", action="store_true", help="Gemma-3-270M + SmolLM2-135M")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.real:
        real_pair(args)
        return

    qwen = AutoTokenizer.from_pretrained(model_dir("qwen2.5-coder-0.5b"))
    smol = AutoTokenizer.from_pretrained(model_dir("smollm2-135m"))
    source = (inspect.getsource(argparse) + inspect.getsource(inspect)) * 2
    texts = [source[i * args.chars : (i + 1) * args.chars] for i in range(args.batch)]
    start = time.perf_counter()
    pair = TokenizerPair(qwen, smol)
    build = time.perf_counter() - start

    config = CALMConfig(every=2)
    anchor = lm(len(qwen), args.width, args.layers, 0)
    paired = CALM(anchor, lm(len(smol), args.width, args.layers, 1), config, tokenizers=pair)
    shared = CALM(anchor, lm(len(qwen), args.width, args.layers, 1), config)

    batch = pair(texts)
    qwen.padding_side = "left"
    same = qwen(texts, padding=True, return_tensors="pt")
    n_anchor = int(batch["attention_mask"].sum())
    n_aug = int(batch["aug_attention_mask"][0].sum())
    print(
        f"batch {args.batch} x {args.chars} chars: {n_anchor} anchor tokens, {n_aug} augmenting "
        f"tokens; pair built in {build:.2f} s (once)"
    )

    tok_same, tok_pair = timed(
        [lambda: qwen(texts, padding=True, return_tensors="pt"), lambda: pair(texts)], args.repeats
    )
    print(f"tokenize: anchor only {tok_same * 1e3:.1f} ms, pair {tok_pair * 1e3:.1f} ms")

    with torch.no_grad():
        fwd_same, fwd_pair = timed([lambda: shared(**same), lambda: paired(**batch)], args.repeats)
    print(
        f"forward: same tokenizer {fwd_same * 1e3:.0f} ms, pair {fwd_pair * 1e3:.0f} ms "
        f"(x{fwd_pair / fwd_same:.2f}); tokenize+forward x"
        f"{(tok_pair + fwd_pair) / (tok_same + fwd_same):.2f}"
    )

    text_sync(pair, qwen, source)

    prompts = [t[:200] for t in texts]
    gen_pair_batch = pair(prompts)
    gen_same_batch = qwen(prompts, padding=True, return_tensors="pt")
    kw = dict(max_new_tokens=args.new, eos_token_id=[], pad_token_id=0)
    gen_same, gen_pair = timed(
        [
            lambda: shared.generate(**gen_same_batch, **kw),
            lambda: paired.generate(**gen_pair_batch, **kw),
        ],
        max(1, args.repeats // 2),
    )
    with StreamTimer() as timer:
        paired.generate(**gen_pair_batch, **kw)
    rate = args.batch * args.new
    print(
        f"generate {args.new} tokens x {args.batch} rows: same tokenizer {rate / gen_same:.1f} "
        f"tok/s, pair {rate / gen_pair:.1f} tok/s (x{gen_pair / gen_same:.2f} time); "
        f"text sync (decode, re-tokenize, commit) {timer.seconds / args.new * 1e3:.1f} ms/step"
    )


if __name__ == "__main__":
    main()
