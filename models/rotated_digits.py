"""Rotated digits: one shared angle rotates a set of scikit-learn 8×8 digit images.

    θ ~ Uniform[0, 2π)
    x_j ~ N(R_θ(d_j), 0.1²) pixelwise,   j = 1..10

``d_j`` is the first image of digit j in ``sklearn.datasets.load_digits`` (pixels
scaled to [0, 1]) and ``R_θ`` rotates an image by θ about its centre (bilinear
``grid_sample``, zero padding). Digits such as 0, 1 and 8 look alike under
rotation by π, so p(x | θ) has several modes: a toy version of the rotated-MNIST
experiment of McNamara, Loper & Regier (NeurIPS 2024) needing no download.

Run ``python models/rotated_digits.py`` to print the observed data's true angle
and the log likelihood around the circle.
"""

import math

import torch
import torch.nn.functional as F

import pyro
import pyro.distributions as dist

PIXEL_SD = 0.1
TRUE_ANGLE = 2.0


def digit_templates() -> torch.Tensor:
    """The first 8×8 image of each digit 0..9, scaled to [0, 1]: shape (10, 8, 8)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    first = [int((digits.target == k).nonzero()[0][0]) for k in range(10)]
    return torch.tensor(digits.images[first], dtype=torch.get_default_dtype()) / 16.0


def rotate(images: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate ``images`` (batch + (H, W)) by ``angle`` (broadcast against the batch)."""
    batch = torch.broadcast_shapes(angle.shape, images.shape[:-2])
    height, width = images.shape[-2:]
    angle = angle.expand(batch).reshape(-1)
    flat = images.expand(batch + (height, width)).reshape(-1, 1, height, width)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(angle)
    affine = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], -2)
    grid = F.affine_grid(affine, list(flat.shape), align_corners=False)
    rotated = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return rotated.reshape(batch + (height, width))


def model(x=None, templates: torch.Tensor | None = None):
    templates = digit_templates() if templates is None else templates
    angle = pyro.sample("angle", dist.Uniform(0.0, 2 * math.pi))
    with pyro.plate("images", templates.shape[0]):
        return pyro.sample("x", dist.Normal(rotate(templates, angle), PIXEL_SD).to_event(2), obs=x)


def observed_data(seed: int = 0, angle: float = TRUE_ANGLE) -> torch.Tensor:
    """Images rotated by ``angle`` with pixel noise: shape (10, 8, 8)."""
    pyro.set_rng_seed(seed)
    templates = digit_templates()
    return rotate(templates, torch.tensor(angle)) + PIXEL_SD * torch.randn(templates.shape)


def log_likelihood(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """log p(x | θ) for each θ in ``angles`` (shape (n,))."""
    means = rotate(digit_templates(), angles.unsqueeze(-1))
    return dist.Normal(means, PIXEL_SD).log_prob(x).sum((-1, -2, -3))


if __name__ == "__main__":
    x = observed_data()
    angles = torch.linspace(0, 2 * math.pi, 73)[:-1]
    ll = log_likelihood(x, angles)
    print(f"true angle {TRUE_ANGLE:.3f}; argmax over a 5-degree grid {angles[ll.argmax()].item():.3f}")
    peaks = [(a.item(), v.item()) for i, (a, v) in enumerate(zip(angles, ll)) if v >= ll[i - 1] and v >= ll[(i + 1) % len(ll)]]
    print("local maxima of log p(x | θ):", [(round(a, 2), round(v, 1)) for a, v in peaks])
