"""ModelScope's and open_clip's own model code, used as references by the parity tests.

Both packages are pinned with --no-deps (see README) and their model files imported by file, because:
- `import modelscope` imports much that is unrelated; its video_synthesis model files (unet_sd.py, autoencoder.py,
  diffusion.py) need only torch, einops and numpy, so they are loaded directly.
- open_clip's package imports torchvision (which would drag a CUDA build of torch in), though its text tower does
  not use it; `open_clip.transformer` is loaded with a stand-in for the one torchvision class its utils import.
- ModelScope's text encoder permutes to sequence-first for open_clip 2's blocks; open_clip 3's blocks are batch-first,
  so `modelscope_text_embedding` applies the same penultimate-layer recipe in batch-first order.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from functools import lru_cache
from pathlib import Path

import torch


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the parity tests need the {name} package installed (pip install --no-deps {name}); see README")
    return Path(list(spec.submodule_search_locations)[0])


def _load_file(module_name: str, path: Path):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=None)
def modelscope_module(name: str):
    """One of modelscope/models/multi_modal/video_synthesis/{unet_sd,autoencoder,diffusion}.py."""
    folder = _package_dir("modelscope") / "models" / "multi_modal" / "video_synthesis"
    return _load_file(f"_modelscope_reference_{name}", folder / f"{name}.py")


# The autoencoder of damo/text-to-video-synthesis (Stable Diffusion's KL-f8), as ModelScope's pipeline configures it.
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def modelscope_unet(cfg: dict) -> torch.nn.Module:
    """ModelScope's UNetSD built from a configuration.json model_cfg, as its pipeline builds it."""
    return modelscope_module("unet_sd").UNetSD(
        in_dim=cfg["unet_in_dim"], dim=cfg["unet_dim"], y_dim=cfg["unet_y_dim"], context_dim=cfg["unet_context_dim"],
        out_dim=cfg["unet_out_dim"], dim_mult=cfg["unet_dim_mult"], num_heads=cfg["unet_num_heads"],
        head_dim=cfg["unet_head_dim"], num_res_blocks=cfg["unet_res_blocks"], attn_scales=cfg["unet_attn_scales"],
        dropout=cfg["unet_dropout"], temporal_attention=True)


@lru_cache(maxsize=None)
def open_clip_transformer():
    folder = _package_dir("open_clip")
    saved = {name: sys.modules.get(name) for name in ("open_clip", "torchvision", "torchvision.ops", "torchvision.ops.misc")}
    package = types.ModuleType("open_clip")
    package.__path__ = [str(folder)]
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = torch.nn.BatchNorm2d  # imported by open_clip.utils, unused by the text tower
    sys.modules.update({"open_clip": package, "torchvision": types.ModuleType("torchvision"),
                        "torchvision.ops": types.ModuleType("torchvision.ops"), "torchvision.ops.misc": misc})
    try:
        return _load_file("open_clip.transformer", folder / "transformer.py")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@lru_cache(maxsize=None)
def open_clip_tokenizer():
    return _load_file("_open_clip_reference_tokenizer", _package_dir("open_clip") / "tokenizer.py").SimpleTokenizer()


def modelscope_text_embedding(text_tower, ids: torch.Tensor) -> torch.Tensor:
    """ModelScope's FrozenOpenCLIPEmbedder(layer='penultimate'): every block but the last, then ln_final."""
    x = text_tower.token_embedding(ids) + text_tower.positional_embedding
    blocks = text_tower.transformer.resblocks
    for block in list(blocks)[:-1]:
        x = block(x, attn_mask=text_tower.attn_mask)
    return text_tower.ln_final(x)
