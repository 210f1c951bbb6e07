"""Network shapes and sizes for both presets, embeddings, Gabor preprocessing."""

import math

import pytest
import torch

from diffusionreg.affine.config import AffineConfig, compact, full, get_config
from diffusionreg.affine.gabor import GaborBinarize, gabor_kernel
from diffusionreg.affine.network import AffineDiffusionNet, count_parameters, sinusoidal_embedding
from diffusionreg.errors import InputError


def test_compact_forward_shape_and_identity_start():
    torch.manual_seed(0)
    cfg = compact()
    net = AffineDiffusionNet(cfg).eval()
    x = torch.rand(2, 2, cfg.grid_size, cfg.grid_size, cfg.grid_size) * 2 - 1
    out = net(x, torch.tensor([1, 65]))
    assert out.shape == (2, 3, 4)
    # zero-initialised head: the untrained compact net predicts exactly I
    assert torch.allclose(out, torch.eye(3, 4).expand(2, 3, 4))
    assert count_parameters(net) * 4 < 20e6  # shipped safetensors below 20 MB


def test_input_is_resized_to_the_training_grid():
    cfg = AffineConfig(grid_size=32, widths=(2, 8, 8, 16, 16, 16, 16), zero_init_head=False)
    net = AffineDiffusionNet(cfg).eval()
    a = net(torch.zeros(1, 2, 40, 28, 36), torch.tensor([3]))
    assert a.shape == (1, 3, 4) and torch.isfinite(a).all()


def test_full_preset_size_on_meta_device():
    cfg = full()
    assert cfg.feature_shape == (4, 4, 4) and cfg.widths == (2, 64, 128, 256, 256, 512, 1024)
    with torch.device("meta"):
        net = AffineDiffusionNet(cfg)
    n = count_parameters(net)
    # the spec quotes about 62.9 M (depends on the head size and classes)
    assert 55e6 < n < 70e6, n
    out = net(torch.empty(1, 2, 256, 256, 256, device="meta"), torch.ones(1, dtype=torch.long, device="meta"))
    assert out.shape == (1, 3, 4)


def test_class_embedding_rows_and_effect():
    cfg = AffineConfig(
        grid_size=32,
        widths=(2, 8, 8, 16, 16, 16, 16),
        n_classes=4,
        class_names=("oct", "octa", "mri", "venous"),
        zero_init_head=False,
    )
    net = AffineDiffusionNet(cfg).eval()
    assert net.blocks[0].class_emb.num_embeddings == 5  # row 0 = null class
    assert cfg.class_index("mri") == 3 and cfg.class_index("any") == 0
    torch.manual_seed(1)
    for b in net.blocks:
        torch.nn.init.normal_(b.class_emb.weight)
    x = torch.rand(1, 2, 32, 32, 32)
    a = net(x, torch.tensor([5]), torch.tensor([0]))
    b = net(x, torch.tensor([5]), torch.tensor([3]))
    assert not torch.allclose(a, b)


def test_sinusoidal_embedding():
    e = sinusoidal_embedding(torch.tensor([0, 7]), 256)
    assert e.shape == (2, 256)
    assert torch.allclose(e[0, :128], torch.zeros(128)) and torch.allclose(e[0, 128:], torch.ones(128))
    assert e[1, 127] == pytest.approx(math.sin(7 * 1e-4), abs=1e-6)  # lowest frequency 1e-4


def test_gabor_kernels_and_binarisation():
    k = gabor_kernel(0.5, math.pi / 2)
    assert k.shape == (5, 5, 5) and float(k.sum()) == pytest.approx(1.0, abs=1e-5)
    # theta = pi/2: carrier along x (last axis) -> symmetric, varies along x most
    assert torch.allclose(k, k.flip(-1)) and torch.allclose(k, k.flip(0))
    g = GaborBinarize()
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    for kind in ("oct", "octa"):
        y = g(x, kind)
        assert set(torch.unique(y).tolist()) <= {-1.0, 1.0}
    assert torch.equal(g(x, "mri"), x)


def test_config_round_trip_and_errors(tmp_path):
    cfg = compact()
    p = tmp_path / "c.json"
    p.write_text(cfg.to_json())
    assert get_config(str(p)) == cfg
    with pytest.raises(InputError):
        get_config("huge")
