"""The README.md model card of a saved composition: pure text built from its records.

`model_card(record, tokenizers, training)` reads what `calm.checkpoint.composition_record` holds
(base-model identities, resolved connections, heads, trainable parameters), the vocabulary sizes
of a `TokenizerPair` if the composition reads through one, and a `calm.train` checkpoint's
state.json, and writes a Hugging Face style card: YAML front matter, what the composition is, the
`CALM.from_pretrained` call that loads it, the training run, and the paper to cite. Nothing here
loads a model or reads a file; loading a composition never reads the card.
"""

from __future__ import annotations

import json
import re
from typing import Any

CARD_NAME = "README.md"
# The card's first body line: a README.md without it was not written by calm and is left alone.
MARKER = "<!-- model card written by calm; rewritten at every save, ignored when loading -->"

CITATION = """\
@inproceedings{bansal2024llm,
  title     = {{LLM} Augmented {LLMs}: Expanding Capabilities through Composition},
  author    = {Bansal, Rachit and Samanta, Bidisha and Dalmia, Siddharth and Gupta, Nitish and
               Vashishth, Shikhar and Ganapathy, Sriram and Bapna, Abhishek and Jain, Prateek and
               Talukdar, Partha},
  booktitle = {The Twelfth International Conference on Learning Representations (ICLR)},
  year      = {2024},
  eprint    = {2401.02412},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2401.02412}
}"""

TAGS = ("calm", "composition", "cross-attention", "arxiv:2401.02412")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "org/name", not a path


def _name(identity: dict) -> str:
    """The name or path a base model was loaded from ("" when it was built in memory)."""
    return identity.get("name_or_path") or ""


def _label(identity: dict) -> str:
    return _name(identity) or f"a {identity.get('class', 'model')} built in memory"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _front_matter(record: dict) -> list[str]:
    """YAML between `---` lines; strings are JSON-quoted (JSON strings are YAML scalars)."""
    lines = ["---", "library_name: calm", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {tag}" for tag in TAGS]
    anchor = _name(record["anchor"])
    if _HUB_ID.match(anchor):
        lines.append(f"base_model: {json.dumps(anchor)}")
    return [*lines, "---"]


def _description(record: dict) -> list[str]:
    augs = record["augments"]
    config = record["config"]
    heads = record.get("num_heads") or config.get("num_heads") or "the anchor's number of"
    n = len(record["connections"])
    return [
        f"# {_label(record['anchor'])} composed with " + ", ".join(_label(a) for a in augs),
        "",
        f"A [CALM](https://arxiv.org/abs/2401.02412) composition (Bansal et al., 2024): the frozen "
        f"anchor model reads {len(augs)} frozen augmenting model{'s' if len(augs) > 1 else ''} "
        f"through {n} trained cross-attention block{'s' if n > 1 else ''} "
        f"({heads} heads each, `{config.get('mode', 'causal')}` mode). This directory holds only "
        f"the blocks: **{record['num_trainable_parameters']:,} trainable parameters** in "
        "`composition.safetensors`, with `calm_config.json` (the configuration and the identity "
        "of every base model). The base models are loaded separately and are never changed.",
        "",
        f"Saved by calm {record.get('calm_version', '')} (the Python package `calm-compose`), "
        "an implementation of CALM for Hugging Face causal LMs.",
    ]


def _models(record: dict) -> list[str]:
    rows = [("anchor", record["anchor"])]
    rows += [(f"augmenting model {i}", a) for i, a in enumerate(record["augments"])]
    lines = [
        "## Base models",
        "",
        "Loading refuses base models whose class, config hash or weights fingerprint differ from "
        "these (`calm.hf.model_identity`; the fingerprint does not depend on the dtype).",
        "",
        "| role | name or path | class | config hash | weights fingerprint |",
        "|---|---|---|---|---|",
    ]
    for role, m in rows:
        name = f"`{_cell(_name(m))}`" if _name(m) else "(not recorded)"
        cells = (role, name, m.get("class"), m.get("config_hash"), m.get("weights_fingerprint"))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _connections(record: dict) -> list[str]:
    lines = [
        "## Connections",
        "",
        "Each block reads the output of one augmenting layer and adds its residual to the output "
        "of one anchor layer (0-based positions in each model's stack of decoder layers).",
        "",
        "| block | augmenting model | augmenting layer | anchor layer |",
        "|---|---|---|---|",
    ]
    for i, c in enumerate(record["connections"]):
        lines.append(f"| {i} | {c['augment']} | {c['aug_layer']} | {c['anchor_layer']} |")
    config = {k: v for k, v in record["config"].items() if k != "connections"}
    return [*lines, "", f"Composition settings (`calm.CALMConfig`): `{json.dumps(config)}`."]


def _load_source(identity: dict, role: str) -> str:
    """A Python literal naming where to load a base model from (a placeholder when unknown)."""
    name = _name(identity)
    if name:
        return repr(name)
    return repr(f"<the {role}: {identity.get('class')} {identity.get('weights_fingerprint')}>")


def loading_code(record: dict, tokenizers: dict | None = None) -> str:
    """The Python that rebuilds the composition from the directory holding the card ("."),
    loading the base models (and the TokenizerPair's tokenizers) from where they came."""
    sources = [_load_source(record["anchor"], "anchor")]
    sources += [_load_source(a, f"augmenting model {i}") for i, a in enumerate(record["augments"])]
    imports = "AutoModelForCausalLM, AutoTokenizer" if tokenizers else "AutoModelForCausalLM"
    lines = [
        "import calm",
        f"from transformers import {imports}",
        "",
        f"anchor = AutoModelForCausalLM.from_pretrained({sources[0]})",
        "augments = [",
        *(f"    AutoModelForCausalLM.from_pretrained({s})," for s in sources[1:]),
        "]",
    ]
    extra = ""
    if tokenizers:
        lines += [
            "tokenizers = calm.TokenizerPair(",
            f"    AutoTokenizer.from_pretrained({sources[0]}),",
            "    [",
            *(f"        AutoTokenizer.from_pretrained({s})," for s in sources[1:]),
            "    ],",
            ")",
        ]
        extra = ", tokenizers=tokenizers"
    lines += [
        'directory = "."  # the directory that holds this README.md',
        f"model = calm.CALM.from_pretrained(directory, anchor, augments{extra})",
    ]
    return "\n".join(lines)


def _loading(record: dict, tokenizers: dict | None) -> list[str]:
    lines = ["## How to load", ""]
    if any(not _name(m) for m in (record["anchor"], *record["augments"])):
        lines += [
            "Some base models were built in memory, so their names were not recorded: replace "
            "each `<...>` with the model of the class and fingerprint listed above.",
            "",
        ]
    lines += ["```python", loading_code(record, tokenizers), "```", ""]
    if tokenizers:
        vocabs = ", ".join(str(v) for v in tokenizers["aug_vocab_sizes"])
        lines += [
            "The models read one text with different tokenizers, so the composition is rebuilt "
            "with the `calm.TokenizerPair` it was trained with: each model's own tokenizer "
            f"(vocabularies of {tokenizers['anchor_vocab_size']} anchor tokens and {vocabs} "
            "augmenting tokens), loaded here from beside each model; point each "
            "`AutoTokenizer` elsewhere if yours lives elsewhere. Batches come from "
            "`tokenizers(texts)`: `model(**batch)`, `model.generate(**batch, max_new_tokens=N)`.",
            "",
        ]
    lines.append(
        "`check_base_models=False` loads onto other base models anyway (the blocks then read "
        "states they were not trained on)."
    )
    return lines


def _loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "not measured"


def _training(training: dict | None) -> list[str]:
    """What a `calm.train` checkpoint's state.json says of the run at this checkpoint."""
    lines = ["## Training", ""]
    if not training:
        return lines + [
            "No training state was given to this save (`CALM.save_pretrained` records none). The "
            "checkpoints that `calm.train` writes list their step and losses here; its `best/` "
            "directory keeps them in `state.json`."
        ]
    best = training.get("best_eval_loss")
    rows = [
        ("step", training.get("step")),
        ("train loss (mean of the last logging window)", _loss(training.get("train_loss"))),
        ("eval loss (last evaluation)", _loss(training.get("eval_loss"))),
        (
            "best eval loss",
            f"{_loss(best)} at step {training.get('best_step')}" if best is not None else "-",
        ),
        ("training examples", training.get("num_examples")),
        ("training data fingerprint", training.get("data_fingerprint")),
        ("processes", training.get("world_size")),
        ("skipped steps (non-finite loss)", training.get("skipped_steps")),
    ]
    lines += ["Trained with `calm.train`; at this checkpoint:", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in rows if value is not None]
    return lines + [
        "",
        "The run directory holds the rest: `train_config.json` (every setting), "
        "`metrics.jsonl` (the loss at every logged step, each evaluation) and `loss.png`.",
    ]


def model_card(record: dict, tokenizers: dict | None = None, training: dict | None = None) -> str:
    """The card's text. record: `composition_record`'s dict; tokenizers: None, or
    {"anchor_vocab_size": int, "aug_vocab_sizes": [int, ...]} for a TokenizerPair; training:
    a `calm.train` checkpoint's state.json (step, train_loss, eval_loss, ...) or None."""
    sections = [
        _description(record),
        _models(record),
        _connections(record),
        _loading(record, tokenizers),
        _training(training),
        ["## Citation", "", "```bibtex", CITATION, "```"],
    ]
    body = "\n\n".join("\n".join(s) for s in sections)
    return "\n".join(_front_matter(record)) + "\n" + MARKER + "\n\n" + body + "\n"
