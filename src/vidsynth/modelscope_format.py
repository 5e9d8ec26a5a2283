"""Reading ModelScope-layout checkpoints (`damo/text-to-video-synthesis` and the fine-tunes that copy it).

The folder holds configuration.json and three pickled weight files; each is converted to the diffusers class of the
same architecture (UNet3DConditionModel, AutoencoderKL, CLIPTextModel). Sizes come from configuration.json and the
tensors' shapes, so narrower checkpoints of the same layout load too. Pickles load with weights_only=True only.
Each module is built on the meta device and takes the checkpoint's tensors: with random initial weights drawn only
to be overwritten, loading the 1.7B model took 37-40 s on a 2-core CPU and peaked at twice the weights' memory
(now 2 s; BENCHMARKS.md).
"""

from __future__ import annotations

import gzip
import json
import pickle
import re
import zipfile
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import ModelError
from .loading import MODELSCOPE_CONFIG as CONFIG_FILE

if TYPE_CHECKING:  # the model libraries are imported where models are built: reading a configuration needs none
    from diffusers import AutoencoderKL, UNet3DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

# configuration.json's model_cfg of damo/text-to-video-synthesis
MS_1_7B = {
    "unet_in_dim": 4, "unet_dim": 320, "unet_y_dim": 768, "unet_context_dim": 1024, "unet_out_dim": 4,
    "unet_dim_mult": [1, 2, 4, 4], "unet_num_heads": 8, "unet_head_dim": 64, "unet_res_blocks": 2,
    "unet_attn_scales": [1, 0.5, 0.25], "unet_dropout": 0.1, "temporal_attention": "True",
}


DEFAULT_FILES = {
    "ckpt_unet": "text2video_pytorch_model.pth",
    "ckpt_autoencoder": "VQGAN_autoencoder.pth",
    "ckpt_clip": "open_clip_pytorch_model.bin",
}
VAE_PREFIX = "first_stage_model."
VAE_SCALING_FACTOR = 0.18215
TEXT_CONTEXT_LENGTH = 77


def is_modelscope_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def read_configuration(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " It looks like an HTML page: download the raw file, not the web page." if "<html" in text[:2000].lower() else ""
        raise ModelError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}).{hint}") from None
    try:
        config["model"]["model_cfg"]
    except (KeyError, TypeError):
        raise ModelError(f"{path} has no model.model_cfg section: not a ModelScope text-to-video configuration") from None
    return config


def load_pickle(path: Path) -> dict:
    """Load a pickled state dict without ever running code from it."""
    if not path.is_file():
        raise ModelError(f"missing weight file {path}")
    try:
        # mmap keeps multi-GB files (the whole OpenCLIP model) out of RAM until their tensors are used.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise ModelError(f"refusing to load {path}: it is a pickle that asks to run code, not plain weights") from None
        raise ModelError(f"{path} is corrupt or truncated: {exc}") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{path} is corrupt or truncated: {str(exc).splitlines()[0]}") from None


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def load_state(module: torch.nn.Module, state: dict, what: str) -> None:
    """Give a module built on the meta device the checkpoint's tensors, in the module's dtypes; every mismatch is
    reported as a ModelError naming the component."""
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"{what} checkpoint does not match its configuration: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")
    try:
        module.load_state_dict({key: tensor.to(expected[key].dtype) for key, tensor in state.items()}, strict=True,
                               assign=True)
    except RuntimeError as exc:
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:4])
        raise ModelError(f"{what} checkpoint shapes do not match its configuration: {detail}") from None
    unfilled = [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta]
    if unfilled:  # buffers a model class computes rather than stores, which its builder here must fill in
        raise ModelError(f"{what}: no values for {unfilled[:3]} (not stored in checkpoints of this layout)")


# ---------------------------------------------------------------------------------------------------------------- UNet

def unet_from_config(model_cfg: dict) -> UNet3DConditionModel:
    from diffusers import UNet3DConditionModel

    dim, mult = int(model_cfg["unet_dim"]), [int(m) for m in model_cfg["unet_dim_mult"]]
    attn_scales = [float(s) for s in model_cfg.get("unet_attn_scales", [1, 0.5, 0.25])]
    if int(model_cfg.get("unet_num_heads", 8)) != 8:
        raise ModelError("unet_num_heads must be 8: the first temporal transformer of this architecture has 8 heads")
    if str(model_cfg.get("temporal_attention", "True")).lower() != "true":
        raise ModelError("only checkpoints with temporal_attention=True are of this architecture")
    has_attention = [1 / 2**level in attn_scales for level in range(len(mult))]
    return UNet3DConditionModel(
        sample_size=32,
        in_channels=int(model_cfg.get("unet_in_dim", 4)),
        out_channels=int(model_cfg.get("unet_out_dim", 4)),
        block_out_channels=tuple(dim * m for m in mult),
        layers_per_block=int(model_cfg.get("unet_res_blocks", 2)),
        cross_attention_dim=int(model_cfg.get("unet_context_dim", 1024)),
        attention_head_dim=int(model_cfg.get("unet_head_dim", 64)),
        down_block_types=tuple("CrossAttnDownBlock3D" if a else "DownBlock3D" for a in has_attention),
        up_block_types=tuple("CrossAttnUpBlock3D" if a else "UpBlock3D" for a in reversed(has_attention)),
    )


def unet_prefix_map(levels: int, res_blocks: int, has_attention: list[bool]) -> dict[str, str]:
    """ModelScope UNet module prefixes -> diffusers UNet3DConditionModel prefixes."""
    prefixes = {
        "time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
        "input_blocks.0.0.": "conv_in.", "input_blocks.0.1.": "transformer_in.",
        "out.0.": "conv_norm_out.", "out.2.": "conv_out.",
        "middle_block.0.temopral_conv.": "mid_block.temp_convs.0.", "middle_block.0.": "mid_block.resnets.0.",
        "middle_block.1.": "mid_block.attentions.0.", "middle_block.2.": "mid_block.temp_attentions.0.",
        "middle_block.3.temopral_conv.": "mid_block.temp_convs.1.", "middle_block.3.": "mid_block.resnets.1.",
    }

    def block(src: str, dst: str, j: int, attention: bool) -> None:
        prefixes[f"{src}.0.temopral_conv."] = f"{dst}.temp_convs.{j}."
        prefixes[f"{src}.0."] = f"{dst}.resnets.{j}."
        if attention:
            prefixes[f"{src}.1."] = f"{dst}.attentions.{j}."
            prefixes[f"{src}.2."] = f"{dst}.temp_attentions.{j}."

    for level in range(levels):
        for j in range(res_blocks):
            block(f"input_blocks.{1 + level * (res_blocks + 1) + j}", f"down_blocks.{level}", j, has_attention[level])
        if level < levels - 1:
            prefixes[f"input_blocks.{(level + 1) * (res_blocks + 1)}.op."] = f"down_blocks.{level}.downsamplers.0.conv."
    for up in range(levels):
        attention = has_attention[levels - 1 - up]
        for j in range(res_blocks + 1):
            block(f"output_blocks.{up * (res_blocks + 1) + j}", f"up_blocks.{up}", j, attention)
        if up < levels - 1:
            upsample_index = 3 if attention else 1
            prefixes[f"output_blocks.{up * (res_blocks + 1) + res_blocks}.{upsample_index}.conv."] = \
                f"up_blocks.{up}.upsamplers.0.conv."
    return prefixes


_RESNET_RENAMES = {
    "in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut.",
}


def unet_from_state(model_cfg: dict, state: dict) -> UNet3DConditionModel:
    """The UNet3DConditionModel of a configuration.json model_cfg, holding a ModelScope UNet state dict's weights."""
    with torch.device("meta"):
        unet = unet_from_config(model_cfg)
    load_state(unet, convert_unet_state(state, unet), "UNet")
    return unet


def convert_unet_state(state: dict, unet: UNet3DConditionModel) -> dict:
    config = unet.config
    has_attention = [t.startswith("CrossAttn") for t in config.down_block_types]
    prefixes = unet_prefix_map(len(config.block_out_channels), config.layers_per_block, has_attention)
    # Longest prefix first, so "x.0.temopral_conv." wins over "x.0.".
    ordered = sorted(prefixes.items(), key=lambda item: -len(item[0]))
    converted = {}
    for key, tensor in state.items():
        for old, new in ordered:
            if key.startswith(old):
                rest = key[len(old):]
                if ".resnets." in new:
                    for old_part, new_part in _RESNET_RENAMES.items():
                        if rest.startswith(old_part):
                            rest = new_part + rest[len(old_part):]
                key = new + rest
                break
        if _is_temporal_projection(key) and tensor.ndim == 3:
            tensor = tensor[:, :, 0]  # Conv1d(k=1) in ModelScope, Linear in diffusers
        converted[key] = tensor
    return converted


def _is_temporal_projection(key: str) -> bool:
    return ("temp_attentions." in key or key.startswith("transformer_in.")) and \
        re.search(r"\.proj_(in|out)\.weight$", key) is not None


# ----------------------------------------------------------------------------------------------------------------- VAE

def vae_from_state(state: dict) -> AutoencoderKL:
    """The AutoencoderKL the LDM-style state dict describes, holding its weights."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae_state = {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    if not vae_state:
        raise ModelError(f"autoencoder checkpoint has no '{VAE_PREFIX}*' weights")
    try:
        base = vae_state["encoder.conv_in.weight"].shape[0]
        levels = 1 + max(int(m) for m in re.findall(r"^encoder\.down\.(\d+)\.", "\n".join(vae_state), re.M))
        res_blocks = 1 + max(int(m) for m in re.findall(r"^encoder\.down\.0\.block\.(\d+)\.", "\n".join(vae_state), re.M))
        channels = tuple(vae_state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels))
        latent_channels = vae_state["decoder.conv_in.weight"].shape[1]
    except (KeyError, ValueError) as exc:
        raise ModelError(f"autoencoder checkpoint is not an LDM KL autoencoder (missing {exc})") from None
    config = {
        "block_out_channels": channels, "layers_per_block": res_blocks, "latent_channels": latent_channels,
        "down_block_types": ("DownEncoderBlock2D",) * levels, "up_block_types": ("UpDecoderBlock2D",) * levels,
        "norm_num_groups": min(32, base), "scaling_factor": VAE_SCALING_FACTOR, "sample_size": 256,
    }
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    prefixed = {VAE_PREFIX + k: v for k, v in vae_state.items()}
    load_state(vae, convert_ldm_vae_checkpoint(prefixed, config), "autoencoder")
    return vae


# -------------------------------------------------------------------------------------------------------- text encoder

def text_encoder_from_state(state: dict) -> CLIPTextModel:
    """OpenCLIP text tower -> CLIPTextModel giving the penultimate block's output after ln_final, as ModelScope uses."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    try:
        vocab, width = state["token_embedding.weight"].shape
        context = state["positional_embedding"].shape[0]
        blocks = 1 + max(int(m) for m in re.findall(r"^transformer\.resblocks\.(\d+)\.", "\n".join(state), re.M))
        intermediate = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except (KeyError, ValueError) as exc:
        raise ModelError(f"text encoder checkpoint is not an OpenCLIP model (missing {exc})") from None
    layers = blocks - 1  # the last block is never used: ModelScope conditions on the penultimate one
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=width // 64, max_position_embeddings=context, hidden_act="gelu",
        layer_norm_eps=1e-5, projection_dim=width, pad_token_id=0, bos_token_id=49406, eos_token_id=49407,
    )
    text_state = {k: v for k, v in state.items()
                  if k in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias")
                  or (k.startswith("transformer.resblocks.") and int(k.split(".")[2]) < layers)}
    with torch.device("meta"):
        model = CLIPTextModel(config)
    for module in model.modules():  # a computed buffer, not in checkpoints
        if isinstance(getattr(module, "position_ids", None), torch.Tensor):
            module.register_buffer("position_ids", torch.arange(context).expand(1, -1), persistent=False)
    converted = convert_open_clip_checkpoint(model, text_state, prefix="")
    if not any(key.startswith("text_model.") for key in model.state_dict()):  # transformers 5 drops the prefix
        converted = {key.removeprefix("text_model."): value for key, value in converted.items()}
    load_state(model, converted, "text encoder")
    return model


def _bytes_to_unicode() -> dict[int, str]:
    # The byte-level alphabet of GPT-2/CLIP BPE: printable bytes map to themselves, the rest to unused code points.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


@lru_cache(maxsize=1)
def openclip_tokenizer() -> CLIPTokenizer:
    """The OpenCLIP/OpenAI CLIP BPE tokenizer, padded with id 0 as open_clip.tokenize pads."""
    from transformers import CLIPTokenizer

    # The vocabulary file is the one open_clip ships; building vocab and merges from it follows CLIP's own recipe.
    with resources.files("vidsynth.assets").joinpath("bpe_simple_vocab_16e6.txt.gz").open("rb") as raw:
        lines = gzip.decompress(raw.read()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [token + "</w>" for token in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
                              model_max_length=TEXT_CONTEXT_LENGTH)
    # Set after construction so "!" pads (id 0, as open_clip) without becoming a special token that splits "!!".
    tokenizer.pad_token = "!"
    return tokenizer


# --------------------------------------------------------------------------------------------------------------- folder

def checkpoint_files(config: dict) -> dict[str, str]:
    """The weight files a configuration names (or the defaults), by the role it gives them (`ckpt_unet`...)."""
    return {**DEFAULT_FILES, **{k: v for k, v in config["model"].get("model_args", {}).items() if k in DEFAULT_FILES}}


def load_modelscope_components(folder: Path) -> dict:
    """All components of a ModelScope-layout folder, converted, in float32 on the CPU."""
    config = read_configuration(folder)
    files = checkpoint_files(config)

    unet_state = load_pickle(folder / files["ckpt_unet"])
    unet = unet_from_state(config["model"]["model_cfg"], unet_state.get("state_dict", unet_state))

    vae_state = load_pickle(folder / files["ckpt_autoencoder"])
    vae = vae_from_state(vae_state.get("state_dict", vae_state))
    text_encoder = text_encoder_from_state(load_pickle(folder / files["ckpt_clip"]))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": openclip_tokenizer(),
            "schedule": None}
