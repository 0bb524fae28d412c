"""The key-value base models: their tokenizer, their shape, and loading the shipped ones.

mA (KV-SUBS only), mB (numeric arithmetic only) and vanilla_mA (KV-SUBS over another map) are
small `LlamaForCausalLM`s over one character-level tokenizer; `pretrain.py` trains them, and the
shipped ones live in `assets/`, each with the `pretrain.json` that records how it was made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from calm import hf
from calm.errors import UserError
from calm.recipes.kv.settings import BASE_MODELS, ModelShape
from calm.tasks.kv import DIGITS, LETTERS, SYMBOLS, KVScale

ASSETS = Path(__file__).parent / "assets"
SPECIAL = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character: letters, digits, operators, '=', '|', plus BOS/EOS/PAD/UNK."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + tuple(LETTERS + DIGITS + SYMBOLS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
    )
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        padding_side="left",
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast, shape: ModelShape, seed: int
) -> LlamaForCausalLM:
    """A freshly initialized small Llama causal LM over `tokenizer`'s vocabulary (eval mode)."""
    return hf.tiny_llama(
        len(tokenizer),
        shape.hidden_size,
        shape.num_layers,
        shape.num_heads,
        intermediate_size=shape.intermediate_size,
        max_positions=shape.max_positions,
        seed=seed,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


@dataclass
class Bases:
    """The shared tokenizer, the base models and the task scale they were trained at."""

    tokenizer: PreTrainedTokenizerFast
    models: dict[str, LlamaForCausalLM]
    scale: KVScale
    shape: ModelShape
    info: dict[str, dict]  # each model's pretrain.json


def load_bases(directory: str | Path | None = None) -> Bases:
    """Load mA, mB and vanilla_mA (and their tokenizer) from `directory` (default: shipped)."""
    root = Path(directory) if directory is not None else ASSETS
    if not (root / "mA" / "pretrain.json").exists():
        raise UserError(
            f"No key-value base models under {root}; train them with `calm pretrain kv` or "
            "`calm reproduce kv --from-scratch`."
        )
    info, found = {}, {}
    for name in BASE_MODELS:
        path = root / name
        if (path / "pretrain.json").exists():
            info[name] = json.loads((path / "pretrain.json").read_text())
            found[name] = LlamaForCausalLM.from_pretrained(path).eval()
    cfg = info["mA"]["config"]
    tokenizer = AutoTokenizer.from_pretrained(root / "mA")
    return Bases(tokenizer, found, KVScale(**cfg["scale"]), ModelShape(**cfg["shape"]), info)
