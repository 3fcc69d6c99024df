"""Diffusion utilities: schedule, DDIM sampling, sample metrics, and the benchmark's FP model.

- `make_schedulers(model)`: diffusers' DDPM/DDIM schedulers with the model's schedule;
- `ddim_sample(model, noise, num_steps=20, record=...)`: deterministic DDIM (eta 0), optionally
  returning the inputs of every step (QuEST's calibration data);
- `vizoo.diffusion.metrics`: Frechet distance in a digit classifier's feature space, PSNR,
  epsilon MSE;
- `vizoo.diffusion.train.train_fp_model`: trains (or reuses) ``ddpm_digits16`` through the engine.
The models are `vizoo.models.diffusion` (``ddpm_digits16``, ``ddpm_digits16_cond``).
"""
from .metrics import (DigitFeatureNet, classify_digits, digit_features, eps_mse, eps_mse_by_timestep,
                      frechet_distance, frechet_distance_from_stats, frechet_to_digits, load_feature_net, psnr)
from .sampling import DEFAULT_NUM_STEPS, SampleResult, ddim_sample, image_grid, save_image_grid
from .schedule import add_noise, alphas_cumprod, ddim_timesteps, make_schedulers

__all__ = ["DEFAULT_NUM_STEPS", "DigitFeatureNet", "SampleResult", "add_noise", "alphas_cumprod",
           "classify_digits", "ddim_sample", "ddim_timesteps", "digit_features", "eps_mse", "eps_mse_by_timestep",
           "frechet_distance", "frechet_distance_from_stats", "frechet_to_digits", "image_grid",
           "load_feature_net", "make_schedulers", "psnr", "save_image_grid"]
