"""
MISVAE: a variational autoencoder whose encoder is a uniform mixture of ``A`` Gaussians, trained
with MISELBO (Hotti, Kviman, Molén, Elvira, Lagergren, "Efficient Mixture Learning in Black-Box
Variational Inference", ICML 2024).

- ``MISVAE(..., encoder="shared")``: the paper's MISVAE, one encoder network shared by all
  components, told which component it is by a one-hot code (:class:`MixtureEncoder`);
- ``MISVAE(..., encoder="separate")``: SEMVAE, ``A`` encoders with their own weights, evaluated in
  one batched pass (:class:`SeparateMixtureEncoder`);
- ``num_components=1``: a plain VAE of the same size.

The model is ``z_n ~ N(0, I)``, ``x_n ~ Bernoulli(sigmoid(decoder(z_n)))`` pixel-wise. Data:
scikit-learn's 8x8 digits (pixel intensities as Bernoulli probabilities: dynamic binarisation each
epoch, one fixed binarisation of the test set), or MNIST from local idx / npz files
(:func:`load_mnist`; nothing is downloaded).

Run ``python models/misvae.py --components 5 --sampled 2 --estimator s2s --epochs 20``.
"""

from __future__ import annotations

import argparse
import gzip
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import pyro
import pyro.distributions as dist
from pyro.infer import SVI

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyro_cavi.miselbo import MISELBO, AmortizedMixtureGuide, MixtureEncoder, mis_log_likelihood  # noqa: E402

# ----------------------------------------------------------------------------- data


def load_digits(test_size: int = 297, seed: int = 0):
    """scikit-learn's 8x8 digits as pixel probabilities in [0, 1]: ``(train_probs, test_binary)``,
    the test set binarised once with ``seed`` (train images are binarised afresh every epoch)."""
    from sklearn.datasets import load_digits as sklearn_digits

    images = torch.as_tensor(sklearn_digits().data, dtype=torch.float32) / 16.0
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    train, test = images[order[test_size:]], images[order[:test_size]]
    return train, torch.bernoulli(test, generator=generator)


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Reads an idx file (LeCun's MNIST format; ``.gz`` allowed) into an array."""
    path = Path(path)
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file: bad magic number {raw[:4].hex()}")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.dtype(_IDX_DTYPES[raw[2]]), offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} values")
    return data.reshape(shape)


_IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def load_mnist(path) -> dict:
    """MNIST from local files: a directory of the four idx files (optionally ``.gz``) or an npz
    with ``x_train, y_train, x_test, y_test`` (the Keras layout). Images come back flattened as
    float32 in [0, 1], labels as int64."""
    path = Path(path)
    arrays = {}
    if path.is_dir():
        for key, stem in _IDX_NAMES.items():
            candidates = [path / stem, path / (stem + ".gz"), path / stem.replace("-idx", ".idx")]
            found = [c for c in candidates if c.exists()]
            if not found:
                raise FileNotFoundError(f"no {stem}[.gz] in {path}")
            arrays[key] = read_idx(found[0])
    elif path.suffix == ".npz":
        with np.load(path) as npz:
            missing = set(_IDX_NAMES) - set(npz.files)
            if missing:
                raise ValueError(f"{path} lacks arrays {sorted(missing)}; it has {npz.files}")
            arrays = {key: npz[key] for key in _IDX_NAMES}
    else:
        raise ValueError(f"{path} is neither a directory of idx files nor an .npz file")
    out = {}
    for split in ("train", "test"):
        x, y = arrays["x_" + split], arrays["y_" + split]
        if len(x) != len(y):
            raise ValueError(f"{split}: {len(x)} images but {len(y)} labels")
        x = torch.as_tensor(np.asarray(x, dtype=np.float32).reshape(len(x), -1))
        out["x_" + split] = x / 255.0 if x.max() > 1 else x
        out["y_" + split] = torch.as_tensor(np.asarray(y, dtype=np.int64))
    return out


# ---------------------------------------------------------------------------- model


class SeparateMixtureEncoder(nn.Module):
    """``A`` one-hidden-layer Gaussian encoders with separate weights (SEMVAE), stored as stacked
    tensors so any subset of components is evaluated in one batched ``einsum``."""

    def __init__(self, input_dim: int, latent_dim: int, num_components: int, hidden_dim: int = 128):
        super().__init__()
        self.num_components = num_components

        def stacked(fan_in, *shape):
            bound = 1.0 / math.sqrt(fan_in)
            return nn.Parameter(torch.empty(num_components, *shape).uniform_(-bound, bound))

        self.w_hidden, self.b_hidden = stacked(input_dim, input_dim, hidden_dim), stacked(input_dim, hidden_dim)
        self.w_loc, self.b_loc = stacked(hidden_dim, hidden_dim, latent_dim), stacked(hidden_dim, latent_dim)
        self.w_scale, self.b_scale = stacked(hidden_dim, hidden_dim, latent_dim), stacked(hidden_dim, latent_dim)

    def forward(self, x, components):
        h = torch.relu(torch.einsum("nd,jdh->jnh", x, self.w_hidden[components]) + self.b_hidden[components, None])
        loc = torch.einsum("jnh,jhl->jnl", h, self.w_loc[components]) + self.b_loc[components, None]
        scale = torch.einsum("jnh,jhl->jnl", h, self.w_scale[components]) + self.b_scale[components, None]
        return loc, nn.functional.softplus(scale) + 1e-5


class MISVAE(nn.Module):
    """Bernoulli VAE with a uniform-mixture encoder of ``num_components`` Gaussians.

    ``vae.model(x)`` and ``vae.guide(x)`` are an ordinary Pyro model / guide pair; train with
    ``SVI(vae.model, vae.guide, optim, loss=MISELBO(...))``. ``name`` prefixes the networks'
    names in Pyro's param store (give each model alive at the same time its own).
    """

    def __init__(self, input_dim: int = 64, latent_dim: int = 8, num_components: int = 1,
                 hidden_dim: int = 128, encoder: str = "shared", name: str = "misvae"):
        super().__init__()
        self.name = name
        if encoder not in ("shared", "separate"):
            raise ValueError(f"encoder must be 'shared' or 'separate', got {encoder!r}")
        self.latent_dim = latent_dim
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, input_dim))
        if encoder == "shared":
            self.encoder = MixtureEncoder(input_dim, latent_dim, num_components, hidden_dims=(hidden_dim,))
        else:
            self.encoder = SeparateMixtureEncoder(input_dim, latent_dim, num_components, hidden_dim)
        self.guide = AmortizedMixtureGuide(self.encoder, site="z", plate="data", name=f"{name}.encoder")

    @property
    def num_components(self) -> int:
        return self.encoder.num_components

    def model(self, x):
        pyro.module(f"{self.name}.decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ------------------------------------------------------------------- train and test


def make_svi(vae: MISVAE, *, estimator: str = "s2a", num_sampled: int = 1, num_particles: int = 1,
             lr: float = 1e-3) -> SVI:
    """``SVI`` with MISELBO (``S = min(num_sampled, A)``) and Adam for ``vae``."""
    elbo = MISELBO(num_components=vae.num_components, num_sampled=min(num_sampled, vae.num_components),
                   estimator=estimator, num_particles=num_particles, vectorize_particles=True,
                   max_plate_nesting=1)
    return SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": lr}), loss=elbo)


def train_epoch(svi: SVI, train_probs, batch_size: int = 100) -> float:
    """One pass over dynamically binarised ``train_probs``; returns the mean -MISELBO per datum."""
    order = torch.randperm(len(train_probs))
    total = 0.0
    for i in range(0, len(order), batch_size):
        total += svi.step(torch.bernoulli(train_probs[order[i: i + batch_size]]))
    return total / len(train_probs)


def train(vae: MISVAE, train_probs, *, epochs: int = 20, batch_size: int = 100, estimator: str = "s2a",
          num_sampled: int = 1, num_particles: int = 1, lr: float = 1e-3, seed: int = 0, verbose: bool = False):
    """Trains ``vae`` with MISELBO on dynamically binarised ``train_probs`` (clearing the param
    store first); returns the mean training loss (-MISELBO per datum) and the wall-clock seconds
    of every epoch."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    svi = make_svi(vae, estimator=estimator, num_sampled=num_sampled, num_particles=num_particles, lr=lr)
    losses, seconds = [], []
    for epoch in range(epochs):
        start = time.perf_counter()
        losses.append(train_epoch(svi, train_probs, batch_size))
        seconds.append(time.perf_counter() - start)
        if verbose:
            print(f"epoch {epoch + 1:3d}  -MISELBO/datum {losses[-1]:8.3f}  {seconds[-1]:.2f}s")
    return losses, seconds


def evaluate_nll(vae: MISVAE, x_test, *, total_samples: int = 1000, batch_size: int = 100) -> float:
    """Mean test NLL, ``-log p(x)`` per image by the MIS bound with ``L = ceil(total_samples / A)``
    draws per component (so every A gets about the same budget)."""
    L = max(1, math.ceil(total_samples / vae.num_components))
    log_px = [
        mis_log_likelihood(vae.model, vae.guide, x_test[i: i + batch_size], num_samples_per_component=L,
                           chunk_size=max(1, 2000 // vae.num_components), max_plate_nesting=1)
        for i in range(0, len(x_test), batch_size)
    ]
    return -torch.cat(log_px).mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--components", type=int, default=5)
    parser.add_argument("--sampled", type=int, default=2)
    parser.add_argument("--estimator", choices=("a2a", "s2a", "s2s"), default="s2s")
    parser.add_argument("--encoder", choices=("shared", "separate"), default="shared")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--mnist", help="directory of MNIST idx files or an .npz (default: 8x8 digits)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.mnist:
        data = load_mnist(args.mnist)
        train_probs = data["x_train"]
        x_test = torch.bernoulli(data["x_test"], generator=torch.Generator().manual_seed(args.seed))
    else:
        train_probs, x_test = load_digits(seed=args.seed)
    vae = MISVAE(train_probs.shape[1], args.latent_dim, args.components, args.hidden_dim, args.encoder)
    train(vae, train_probs, epochs=args.epochs, estimator=args.estimator, num_sampled=args.sampled,
          seed=args.seed, verbose=True)
    print(f"A={args.components} S={args.sampled} {args.estimator} {args.encoder}: "
          f"{vae.num_parameters()} parameters, test NLL {evaluate_nll(vae, x_test):.3f} nats")


if __name__ == "__main__":
    main()
