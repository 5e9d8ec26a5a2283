"""vidsynth against diffusers' TextToVideoSDPipeline on the same model (a tiny random one, the shipped one): same
seed, DDIM, float32."""

import numpy as np
import torch
from diffusers import DDIMScheduler, TextToVideoSDPipeline

import vidsynth
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


def test_the_shipped_model_makes_diffusers_frames():
    """The shipped model's schedule (v-prediction, zero terminal SNR, trailing timesteps) through both pipelines."""
    shipped = vidsynth.load(device="cpu", dtype="float32")  # float32 on any CPU: bfloat16 rounds differently
    parts = shipped.components
    reference = TextToVideoSDPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                      unet=parts.unet, scheduler=DDIMScheduler.from_config(parts.schedule))
    reference.set_progress_bar_config(disable=True)
    prompt = "a green square moving right on a white background"
    expected = reference(prompt, num_frames=8, height=64, width=64, num_inference_steps=4, guidance_scale=4.0,
                         generator=torch.Generator("cpu").manual_seed(7), output_type="np").frames[0]
    # diffusers guides every step; the shipped model's own default guides only the first half.
    video = shipped(prompt, frames=8, height=64, width=64, steps=4, guidance=4.0, seed=7, scheduler="ddim",
                    guidance_fraction=1.0, progress=False)

    assert np.abs(video.frames.astype(np.float64) / 255 - expected).max() <= 1 / 255
    assert video.frames.std() > 5
