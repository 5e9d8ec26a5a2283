"""Model loading: one entry point from a `--model` reference to the components of a ModelScope-architecture model.

A reference is an alias (`ms-1.7b`), a local folder in diffusers or ModelScope layout, a Hugging Face repo id
(resolved through the standard cache, honouring HF_HOME and HF_HUB_OFFLINE), or `modelscope:<id>`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

from .errors import ModelError, ModelUnavailableError, RequestError, VidsynthError, WriteError
from .files import storage_refusal
from .registry import DEFAULTS_FILE, HUB_IDS, KNOWN_MODELS, SHIPPED_MODEL, KnownModel, package_model_path
from .request import ModelDefaults, checked_defaults

if TYPE_CHECKING:  # the model libraries are imported by the functions that load models: finding one needs none
    import torch
    from diffusers import AutoencoderKL, UNet3DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

DIFFUSERS_INDEX = "model_index.json"
MODELSCOPE_CONFIG = "configuration.json"  # named here, not in modelscope_format, so finding a model imports no torch
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# What names a model: an alias, a hub id, a folder's path as text or as a path object; None for the shipped model.
ModelReference = Union[str, os.PathLike, None]
SHARD_NAME = re.compile(r"-\d{5}-of-(\d{5})(?:\.fp16)?\.(?:safetensors|bin)$")


@dataclass
class Components:
    """Everything a generation needs, on the CPU until the pipeline places it."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet3DConditionModel
    vae: AutoencoderKL
    schedule: Optional[dict]  # diffusers scheduler config of the training noise schedule; None = ModelScope's
    defaults: ModelDefaults
    name: str
    source: dict = field(default_factory=dict)  # where it came from, for `vidsynth info` and metadata
    # The words of the captions the model was trained on, when vidsynth trained it (None: trained elsewhere, on
    # captions unknown here). A prompt's other words get a warning: such a model cannot draw what they say.
    vocabulary: Optional[frozenset[str]] = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


@dataclass(frozen=True)
class ModelLocation:
    path: Path
    name: str
    known: Optional[KnownModel] = None


def model_source(reference: ModelReference) -> tuple[str, str, Optional[KnownModel]]:
    """Where a --model reference points, fetching nothing: (kind, target, known model) with kind "package", "hf",
    "modelscope" or "folder". ModelError for a reference that points nowhere, so a command can refuse it before
    loading anything. A path object (pathlib.Path) names a folder, never an alias or a hub id."""
    reference = reference or SHIPPED_MODEL
    named = isinstance(reference, str)
    if named:
        known = KNOWN_MODELS.get(reference) or HUB_IDS.get(reference.removeprefix("modelscope:"))
        if known:
            kind, target = known.source.split(":", 1)
            return kind, target, known
        if reference.startswith("modelscope:"):
            return "modelscope", reference.split(":", 1)[1], None
    path = Path(reference).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{reference} is a file; a model is a folder (diffusers or ModelScope layout)")
        return "folder", str(path), None
    if not named:
        raise ModelError(f"model folder {reference} not found")
    if _looks_like_repo_id(reference):
        return "hf", reference, None
    raise ModelError(f"model {reference!r} not found: no such folder, and not a known alias "
                     f"({', '.join(KNOWN_MODELS)}) or a hub id like owner/name")


def locate(reference: ModelReference, *, half_precision: bool = False) -> ModelLocation:
    """Turn a --model reference into a local folder, downloading into the hub cache what it lacks."""
    kind, target, known = model_source(reference)
    if kind == "package":
        path = package_model_path(target)
        if not path.is_dir():
            raise ModelError(f"the shipped model is missing from this installation ({path}); reinstall vidsynth")
    elif kind == "hf":
        path = hf_snapshot(target, half_precision)
    elif kind == "modelscope":
        path = modelscope_snapshot(target)
    else:
        path = Path(target)
    if known:
        return ModelLocation(path, known.alias, known)
    # A folder by its full path, so that `generate --from` finds it again; a hub model by its id.
    return ModelLocation(path, str(path.resolve()) if kind == "folder" else reference)


def _looks_like_repo_id(reference: str) -> bool:
    parts = reference.split("/")
    return len(parts) == 2 and all(parts) and not reference.startswith((".", "~")) and os.sep not in reference.replace("/", "")


def hf_snapshot(repo_id: str, half_precision: bool) -> Path:
    """The model's folder in the Hugging Face cache: as cached when it holds every part a load needs (in whichever
    precision it was fetched), else fetched, unless the hub is offline (HF_HUB_OFFLINE), with only
    the files a load reads: in diffusers layout the configurations, tokenizer and one set of weights per model
    (float16 files for half precision where the repo has them; the repo's other formats, variants and folders stay
    on the hub), in ModelScope layout the configuration and the weight files it names."""
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    cached, missing = cached_snapshot(repo_id)
    if cached is not None and not missing:
        return cached
    if constants.HF_HUB_OFFLINE:
        held = "not in" if missing is None else f"only partly (missing: {', '.join(missing)}) in"
        raise ModelUnavailableError(f"{repo_id} is {held} the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                                    f"fetching is off (HF_HUB_OFFLINE). {_elsewhere(repo_id)}")
    # The hub client raises its HTTP library's own errors for a hub it cannot reach, and HfHubHTTPError for one that
    # refuses: either way the model could not be fetched.
    try:
        names = [sibling.rfilename for sibling in HfApi().model_info(repo_id).siblings]
    except RepositoryNotFoundError:
        raise ModelError(f"{repo_id} is not a model on the Hugging Face hub (or it is private: log in with "
                         f"`hf auth login`)") from None
    except Exception as exc:
        raise _not_fetched(repo_id, exc) from None
    try:
        if DIFFUSERS_INDEX not in names and MODELSCOPE_CONFIG in names:  # the configuration names the weight files
            folder = Path(hf_hub_download(repo_id, MODELSCOPE_CONFIG)).parent
            wanted = [MODELSCOPE_CONFIG, *modelscope_weight_files(folder)]
        else:
            wanted = hub_files_to_fetch(repo_id, names, half_precision)
        with download_progress_shown():
            return Path(snapshot_download(repo_id, allow_patterns=wanted))
    except VidsynthError:
        raise
    except Exception as exc:
        not_stored = _not_stored(repo_id, exc, f"the Hugging Face cache ({constants.HF_HUB_CACHE})", "HF_HOME")
        raise (not_stored or _not_fetched(repo_id, exc)) from None


def cached_snapshot(repo_id: str) -> tuple[Optional[Path], Optional[list[str]]]:
    """The Hugging Face cache's copy of a repo and the parts it lacks for a load ([] when complete); (None, None)
    when the cache holds none of it. Asks no hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        cached = Path(snapshot_download(repo_id, allow_patterns=[DIFFUSERS_INDEX, MODELSCOPE_CONFIG],
                                        local_files_only=True))
    except LocalEntryNotFoundError:
        return None, None
    return cached, missing_parts(cached)


def _not_fetched(repo_id: str, exc: Exception) -> ModelUnavailableError:
    return ModelUnavailableError(f"{repo_id} could not be fetched from the Hugging Face hub ({type(exc).__name__}: "
                                 f"{_first_line(exc)}); run the command again to resume. {_elsewhere(repo_id)}")


def _not_stored(model_id: str, exc: Exception, cache: str, variable: str) -> Optional[WriteError]:
    """The error to raise when a download failed because the disk refused it (full), not the hub."""
    reason = storage_refusal(exc)
    if reason is None:
        return None
    return WriteError(f"could not store {model_id} in {cache}: {reason}; make room there, or set {variable} to a "
                      f"folder on a disk with room, and run the command again: the download resumes", reason)


def _elsewhere(repo_id: str) -> str:
    return (f"On a machine with network run `vidsynth download {repo_id}` (or `hf download {repo_id}`) and copy the "
            f"cache folder models--{repo_id.replace('/', '--')} here, or put a diffusers-layout folder "
            f"(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) anywhere and pass its path as "
            f"--model.")


@contextlib.contextmanager
def download_progress_shown():
    """Within the block the hub client shows its progress bars: a download of gigabytes must show it is moving, also
    where a front end hid the libraries' bars (the CLI does, for their loading bars). HF_HUB_DISABLE_PROGRESS_BARS
    still hides them."""
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    hidden = are_progress_bars_disabled()
    if hidden and not constants.HF_HUB_DISABLE_PROGRESS_BARS:
        enable_progress_bars()
    try:
        yield
    finally:
        if hidden and not constants.HF_HUB_DISABLE_PROGRESS_BARS:
            disable_progress_bars()


def hub_files_to_fetch(repo_id: str, names: list[str], half_precision: bool) -> list[str]:
    """Of a diffusers-layout repo's files, those a load reads: model_index.json and vidsynth's defaults, every
    configuration and tokenizer file of the components, and one set of weights per model (`preferred_weights`)."""
    if DIFFUSERS_INDEX not in names:
        raise ModelError(f"{repo_id} is neither a diffusers-layout model (no {DIFFUSERS_INDEX}) nor a "
                         f"ModelScope-layout one (no {MODELSCOPE_CONFIG})")
    wanted = [name for name in names if name in (DIFFUSERS_INDEX, DEFAULTS_FILE)
              or (name.endswith((".json", ".txt")) and name.split("/")[0] in COMPONENTS and name.count("/") == 1)]
    for part in WEIGHTED_COMPONENTS:
        in_folder = [name.split("/", 1)[1] for name in names if name.startswith(f"{part}/") and name.count("/") == 1]
        choice = preferred_weights(in_folder, half_precision)
        if choice is None:
            raise ModelError(f"{repo_id} has no weights for its {part} (.safetensors or .bin files in {part}/)")
        wanted += [f"{part}/{name}" for name in choice[1]]
    return wanted


def modelscope_weight_files(folder: Path) -> list[str]:
    """The weight files the configuration in a ModelScope-layout folder names."""
    from . import modelscope_format
    return list(modelscope_format.checkpoint_files(modelscope_format.read_configuration(folder)).values())


def missing_parts(folder: Path) -> list[str]:
    """What a model folder lacks for a load (after an interrupted download, say): [] when complete."""
    if not (folder / DIFFUSERS_INDEX).is_file() and (folder / MODELSCOPE_CONFIG).is_file():
        return [name for name in modelscope_weight_files(folder) if not (folder / name).is_file()]
    missing = [] if (folder / DIFFUSERS_INDEX).is_file() else [DIFFUSERS_INDEX]
    for part in WEIGHTED_COMPONENTS:
        names = [path.name for path in (folder / part).glob("*")]
        if "config.json" not in names or preferred_weights(names, half_precision=False) is None:
            missing.append(f"{part}/")
    if not (folder / "tokenizer").is_dir() or not any((folder / "tokenizer").iterdir()):
        missing.append("tokenizer/")
    return missing


def weight_sets(names: Iterable[str]) -> dict[tuple[str, Optional[str]], list[str]]:
    """The complete sets of weight files among one component's file names, by (format, variant): a single file, or
    every shard of a sharded checkpoint (`...-00001-of-00003.safetensors`). Variant "fp16" or None."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        if not name.endswith(WEIGHT_SUFFIXES):
            continue
        shard = SHARD_NAME.search(name)
        key = ("safetensors" if name.endswith(".safetensors") else "bin", "fp16" if ".fp16" in name else None,
               int(shard.group(1)) if shard else None)
        groups.setdefault(key, []).append(name)
    complete: dict[tuple[str, Optional[str]], list[str]] = {}
    for (fmt, variant, shards), files in groups.items():
        if shards is None or len(files) == shards:
            complete.setdefault((fmt, variant), sorted(files))
    return complete


def preferred_weights(names: Iterable[str], half_precision: bool) -> Optional[tuple[Optional[str], list[str]]]:
    """The variant and files to load of one component: safetensors before .bin (both load without running code,
    safetensors faster), float16 files for half precision and full-precision ones otherwise, each where present."""
    sets = weight_sets(names)
    variants = ("fp16", None) if half_precision else (None, "fp16")
    for fmt, variant in [(fmt, variant) for variant in variants for fmt in ("safetensors", "bin")]:
        if (fmt, variant) in sets:
            return variant, sets[(fmt, variant)]
    return None


def modelscope_snapshot(model_id: str) -> Path:
    """The model's folder in the ModelScope cache, as `hf_snapshot` for the ModelScope hub: as cached when complete,
    else fetched: its configuration, then the three weight files it names."""
    snapshot_download = _modelscope_client(model_id)
    cached, missing = cached_modelscope_snapshot(model_id)
    if cached is not None and not missing:
        return cached
    try:
        folder = Path(snapshot_download(model_id, allow_patterns=[MODELSCOPE_CONFIG]))
        if not (folder / MODELSCOPE_CONFIG).is_file():
            raise ModelError(f"{model_id} on the ModelScope hub has no {MODELSCOPE_CONFIG}: not a ModelScope-layout "
                             f"model")
        wanted = [MODELSCOPE_CONFIG, *modelscope_weight_files(folder)]
        return Path(snapshot_download(model_id, allow_patterns=wanted))
    except VidsynthError:
        raise
    except Exception as exc:  # the client raises its own errors and its HTTP library's, which are not all OSErrors
        if getattr(getattr(exc, "response", None), "status_code", None) == 404:
            raise ModelError(f"{model_id} is not a model on the ModelScope hub") from None
        not_stored = _not_stored(model_id, exc, "the ModelScope cache", "MODELSCOPE_CACHE")
        if not_stored is not None:
            raise not_stored from None
        raise ModelUnavailableError(f"{model_id} could not be fetched from the ModelScope hub ({type(exc).__name__}: "
                                    f"{_first_line(exc)}); run the command again to resume. Or put its files "
                                    f"({MODELSCOPE_CONFIG}, text2video_pytorch_model.pth, VQGAN_autoencoder.pth, "
                                    f"open_clip_pytorch_model.bin) in one folder and pass it as --model.") from None


def cached_modelscope_snapshot(model_id: str) -> tuple[Optional[Path], Optional[list[str]]]:
    """The ModelScope cache's copy of a model and the parts it lacks ([] when complete); (None, None) when none is
    cached or the ModelScope client is not installed. Asks no hub, and imports no client (seconds) when there is no
    ModelScope cache at all: the client keeps it under MODELSCOPE_CACHE, by default in ~/.cache/modelscope."""
    if not Path(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope").exists():
        return None, None
    try:
        snapshot_download = _modelscope_client(model_id)
        cached = Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # ModelError without the client; the client's own error for a model it has not cached
        return None, None
    if not (cached / MODELSCOPE_CONFIG).is_file():
        return cached, [MODELSCOPE_CONFIG]
    return cached, missing_parts(cached)


def _modelscope_client(model_id: str):
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError:
        raise ModelError(f"fetching {model_id} from the ModelScope hub needs the optional extra: "
                         f"pip install 'vidsynth[modelscope]'; or download it and pass the folder as --model") from None
    return snapshot_download


def load_components(reference: ModelReference = None, *, dtype: Optional[torch.dtype] = None) -> Components:
    """The model's components in `dtype` (default float32), on the CPU."""
    import torch

    from . import modelscope_format
    dtype = dtype or torch.float32
    location = locate(reference, half_precision=dtype in (torch.float16, torch.bfloat16))
    folder = location.path
    if (folder / DIFFUSERS_INDEX).is_file():
        parts, layout = load_diffusers_components(folder, dtype), "diffusers"
    elif modelscope_format.is_modelscope_folder(folder):
        parts, layout = modelscope_format.load_modelscope_components(folder), "modelscope"
    else:
        raise ModelError(f"{folder} is neither a diffusers-layout model folder (no {DIFFUSERS_INDEX}) nor a "
                         f"ModelScope-layout one (no {MODELSCOPE_CONFIG})")
    for name in ("unet", "vae", "text_encoder"):
        parts[name].eval().requires_grad_(False)  # built modules start in training mode, with dropout on
    defaults, vocabulary = read_model_settings(folder, parts)
    return Components(**parts, defaults=location.known.defaults if location.known else defaults, name=location.name,
                      source={"path": str(folder), "layout": layout}, vocabulary=vocabulary)


def read_model_settings(folder: Path, parts: dict[str, Any]) -> tuple[ModelDefaults, Optional[frozenset[str]]]:
    """The native settings and the training vocabulary vidsynth saved with a model; for other models, defaults from
    the UNet's sample size and no vocabulary."""
    path = folder / DEFAULTS_FILE
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            vocabulary = saved.get("vocabulary")
            return checked_defaults(saved["defaults"]), frozenset(vocabulary) if vocabulary is not None else None
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"{path} is not a valid vidsynth settings file: {exc}") from None
        except RequestError as exc:
            raise ModelError(f"{path}: defaults.{exc.field}: {exc.message}") from None
    side = (parts["unet"].config.sample_size or 32) * 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    return ModelDefaults(height=side, width=side), None


def _read_index(folder: Path) -> dict:
    try:
        index = json.loads((folder / DIFFUSERS_INDEX).read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{folder / DIFFUSERS_INDEX} is not valid JSON ({exc.msg})") from None
    missing = [name for name in COMPONENTS if name not in index]
    if missing:
        raise ModelError(f"{folder} is not a text-to-video model: model_index.json lacks {', '.join(missing)}")
    if index["unet"][1] != "UNet3DConditionModel":
        raise ModelError(f"{folder} holds a {index['unet'][1]}, not the UNet3DConditionModel of ModelScope's architecture")
    return index


def _variant(subfolder: Path, half_precision: bool) -> Optional[str]:
    choice = preferred_weights((path.name for path in subfolder.glob("*")), half_precision)
    return choice[0] if choice else None


def load_diffusers_components(folder: Path, dtype: torch.dtype) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, UNet3DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _read_index(folder)
    parts: dict[str, Any] = {}
    loaders = {"unet": UNet3DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    half_precision = dtype in (torch.float16, torch.bfloat16)
    for name, cls in loaders.items():
        subfolder = folder / name
        try:
            # Both libraries load .bin files with torch.load(weights_only=True) and prefer .safetensors.
            parts[name] = cls.from_pretrained(subfolder, torch_dtype=dtype, variant=_variant(subfolder, half_precision))
        except Exception as exc:  # diffusers/transformers raise OSError, ValueError, RuntimeError, SafetensorError...
            raise ModelError(f"cannot load {name} from {subfolder}: {type(exc).__name__}: {_first_line(exc)}") from None
    try:
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    except Exception as exc:
        raise ModelError(f"cannot load tokenizer from {folder / 'tokenizer'}: {_first_line(exc)}") from None
    schedule_path = folder / "scheduler" / "scheduler_config.json"
    parts["schedule"] = json.loads(schedule_path.read_text()) if schedule_path.is_file() else None
    return parts


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def save_model_folder(components: Components, folder: Path, *, dtype: Optional[torch.dtype] = None) -> Path:
    """Write `components` as a diffusers-layout folder of safetensors (loadable by vidsynth and by diffusers)."""
    import diffusers

    from .schedulers import MODELSCOPE_SCHEDULE
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(components, name)
        original = next(module.parameters()).dtype
        module.to(dtype or original).save_pretrained(folder / name, safe_serialization=True)
        module.to(original)
        _forget_source_path(folder / name / "config.json")
    components.tokenizer.save_pretrained(folder / "tokenizer")
    scheduler_dir = folder / "scheduler"
    scheduler_dir.mkdir(exist_ok=True)
    schedule = {"_class_name": "DDIMScheduler", "_diffusers_version": diffusers.__version__,
                **(components.schedule or MODELSCOPE_SCHEDULE)}
    (scheduler_dir / "scheduler_config.json").write_text(json.dumps(schedule, indent=2) + "\n")
    index = {
        "_class_name": "TextToVideoSDPipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet3DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / DIFFUSERS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    settings: dict[str, Any] = {"defaults": components.defaults.as_dict()}
    if components.vocabulary is not None:
        settings["vocabulary"] = sorted(components.vocabulary)
    (folder / DEFAULTS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return folder


def _forget_source_path(config_file: Path) -> None:
    # diffusers records the folder a model was loaded from; in a saved copy that path only names the machine it
    # was converted on.
    config = json.loads(config_file.read_text())
    if config.pop("_name_or_path", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
