"""Respaced schedules: sample with a subset of the training timesteps."""

import numpy as np

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """The set of original timesteps to keep.

    section_counts: "ddimN" (a fixed stride giving exactly N steps, as DDIM does), or
    a comma-separated string / list of counts: the schedule is cut into that many equal
    sections and each keeps that many evenly spaced steps ("250" keeps 250 of 1000).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired_count} steps with an integer stride "
                             f"from {num_timesteps}; choose another ddimN")
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"timestep respacing must be like '250', '10,20' or 'ddim50', "
                             f"got {section_counts!r}") from None
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count or section_count < 1:
            raise ValueError(f"cannot take {section_count} steps from a section of {size} timesteps")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over the kept timesteps `use_timesteps` of the base schedule `betas`.

    Betas are recomputed so that the kept steps have the base alphas_cumprod; the model
    is always called with the original timestep indices.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        base_alphas_cumprod = np.cumprod(1.0 - np.asarray(kwargs["betas"], dtype=np.float64))
        last_alpha_cumprod = 1.0
        new_betas, timestep_map = [], []
        for i, alpha_cumprod in enumerate(base_alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                timestep_map.append(i)
        self.original_num_steps = len(base_alphas_cumprod)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(timestep_map=timestep_map, **kwargs)
