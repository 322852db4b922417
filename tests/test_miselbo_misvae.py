"""MISVAE (models/misvae.py): data loaders, encoders, training on the 8x8 digits."""
import gzip

import numpy as np
import pytest
import torch

import pyro

from models.misvae import MISVAE, SeparateMixtureEncoder, load_digits, load_mnist, read_idx, evaluate_nll, train


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_idx(path, array, gz=False):
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture
def tiny_mnist():
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, size=(3, 4, 4), dtype=np.uint8),
        "y_train": rng.integers(0, 10, size=3, dtype=np.uint8),
        "x_test": rng.integers(0, 256, size=(2, 4, 4), dtype=np.uint8),
        "y_test": rng.integers(0, 10, size=2, dtype=np.uint8),
    }


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_from_idx_files(tmp_path, tiny_mnist, gz):
    names = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
    for key, name in names.items():
        write_idx(tmp_path / (name + (".gz" if gz else "")), tiny_mnist[key], gz=gz)
    data = load_mnist(tmp_path)
    assert data["x_train"].shape == (3, 16) and data["x_test"].shape == (2, 16)
    assert torch.allclose(data["x_train"], torch.as_tensor(tiny_mnist["x_train"].reshape(3, 16) / 255.0, dtype=torch.float32))
    assert data["y_test"].tolist() == tiny_mnist["y_test"].tolist()


def test_load_mnist_from_npz(tmp_path, tiny_mnist):
    np.savez(tmp_path / "mnist.npz", **tiny_mnist)
    data = load_mnist(tmp_path / "mnist.npz")
    assert torch.allclose(data["x_test"], torch.as_tensor(tiny_mnist["x_test"].reshape(2, 16) / 255.0, dtype=torch.float32))
    assert data["y_train"].tolist() == tiny_mnist["y_train"].tolist()


def test_loader_errors_name_the_file(tmp_path, tiny_mnist):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="bad-idx is not an idx file: bad magic number 01020304"):
        read_idx(bad)
    short = tmp_path / "short"
    write_idx(short, tiny_mnist["x_train"])
    short.write_bytes(short.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"header says shape \(3, 4, 4\) but holds 43 values"):
        read_idx(short)
    np.savez(tmp_path / "partial.npz", x_train=tiny_mnist["x_train"])
    with pytest.raises(ValueError, match=r"lacks arrays \['x_test', 'y_test', 'y_train'\]"):
        load_mnist(tmp_path / "partial.npz")
    with pytest.raises(FileNotFoundError, match="no train-images-idx3-ubyte"):
        load_mnist(tmp_path)


def test_separate_encoder_batches_independent_networks():
    torch.manual_seed(0)
    encoder = SeparateMixtureEncoder(6, 2, num_components=3, hidden_dim=5)
    x = torch.rand(4, 6)
    loc, scale = encoder(x, torch.tensor([2, 0]))
    for row, a in enumerate([2, 0]):
        h = torch.relu(x @ encoder.w_hidden[a] + encoder.b_hidden[a])
        assert torch.allclose(loc[row], h @ encoder.w_loc[a] + encoder.b_loc[a], atol=1e-6)
        ref_scale = torch.nn.functional.softplus(h @ encoder.w_scale[a] + encoder.b_scale[a]) + 1e-5
        assert torch.allclose(scale[row], ref_scale, atol=1e-6)


def test_parameter_counts():
    input_dim, latent, hidden, A = 64, 8, 32, 5
    vae = MISVAE(input_dim, latent, 1, hidden)
    misvae = MISVAE(input_dim, latent, A, hidden)
    semvae = MISVAE(input_dim, latent, A, hidden, encoder="separate")
    decoder = latent * hidden + hidden + hidden * input_dim + input_dim
    encoder = input_dim * hidden + hidden + 2 * (hidden * latent + latent)
    assert vae.num_parameters() == decoder + encoder + hidden  # + one component code
    assert misvae.num_parameters() == decoder + encoder + A * hidden
    assert semvae.num_parameters() == decoder + A * encoder


def test_digits_split_and_fixed_test_binarisation():
    train_probs, x_test = load_digits(seed=0)
    assert train_probs.shape == (1500, 64) and x_test.shape == (297, 64)
    assert 0 <= train_probs.min() and train_probs.max() <= 1
    assert set(x_test.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(x_test, load_digits(seed=0)[1])


@pytest.mark.parametrize("estimator,encoder", [("s2s", "shared"), ("s2a", "separate")])
def test_misvae_learns_digits(estimator, encoder):
    train_probs, x_test = load_digits(seed=0)
    pyro.set_rng_seed(0)
    vae = MISVAE(64, 4, 4, 32, encoder=encoder)
    before = evaluate_nll(vae, x_test[:50], total_samples=40)
    losses, _ = train(vae, train_probs[:500], epochs=6, estimator=estimator, num_sampled=2, lr=3e-3)
    after = evaluate_nll(vae, x_test[:50], total_samples=40)
    assert losses[-1] < losses[0] - 3.0
    assert after < before - 3.0
