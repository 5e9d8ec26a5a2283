"""vidsynth against diffusers' TextToVideoSDPipeline on the same tiny random model: same seed, DDIM, fp32."""

import numpy as np
import torch
from diffusers import TextToVideoSDPipeline

from vidsynth.schedulers import make_scheduler


def test_same_frames_as_diffusers(tiny_model_dir, tiny_pipeline):
    settings = dict(frames=4, height=32, width=32, steps=3, guidance=9.0, seed=1234)
    reference = TextToVideoSDPipeline.from_pretrained(tiny_model_dir).to("cpu")
    expected = reference("a red circle moving left", negative_prompt="blurry", num_frames=settings["frames"],
                         height=32, width=32, num_inference_steps=3, guidance_scale=9.0,
                         generator=torch.Generator("cpu").manual_seed(1234), output_type="np").frames[0]
    video = tiny_pipeline("a red circle moving left", negative_prompt="blurry", progress=False, **settings)

    assert video.frames.dtype == np.uint8 and video.frames.shape == (4, 32, 32, 3)
    difference = np.abs(video.frames.astype(np.float64) / 255 - expected).max()
    assert difference <= 1 / 255, difference
    # The model is random but not constant: the comparison is not between two flat images.
    assert video.frames.std() > 5


def test_ddim_timesteps_are_modelscope_s():
    scheduler = make_scheduler("ddim")
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(981, 0, -20))
    assert float(scheduler.final_alpha_cumprod) == float(scheduler.alphas_cumprod[0])
