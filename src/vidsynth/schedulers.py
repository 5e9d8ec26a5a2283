"""Samplers by name, all built from diffusers' schedulers on the model's training noise schedule."""

from __future__ import annotations

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

from .errors import RequestError

# ModelScope's training schedule and its DDIM sampler: timesteps 981, 961, ..., 1 for 50 steps, and the last step
# lands on alphas_cumprod[0] rather than 1.
MODELSCOPE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

# The schedule `vidsynth train` gives models it trains from scratch: ModelScope's betas rescaled to zero terminal
# SNR, with v-prediction and trailing timesteps (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
# are Flawed"). On ModelScope's own schedule the noisiest step keeps 7 % of the signal, so a model trained on it
# reads the background and the shape's colour from the noisy input itself, never has to learn them from the
# caption, and then draws at random from the pure noise sampling starts with.
SCRATCH_SCHEDULE = {**MODELSCOPE_SCHEDULE, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                    "timestep_spacing": "trailing"}

_CLASSES = {
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {"solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
}


def make_scheduler(name: str, schedule: dict | None = None):
    """A fresh scheduler `name` on `schedule` (a diffusers scheduler config; ModelScope's when None)."""
    if name not in _CLASSES:
        raise RequestError("scheduler", f"unknown scheduler {name!r}; choose from {', '.join(_CLASSES)}")
    cls, extra = _CLASSES[name]
    config = {key: value for key, value in (schedule or MODELSCOPE_SCHEDULE).items() if not key.startswith("_")}
    return cls.from_config({**config, **extra})
