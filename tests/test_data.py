import pytest
import torch

from gaaf_patch import data


def test_digits_is_whole_and_scaled():
    s = data.digits()
    assert s.images.shape == (1797, 1, 8, 8) and s.images.dtype == torch.float32
    assert float(s.images.min()) == 0.0 and float(s.images.max()) == 1.0
    assert s.labels.dtype == torch.int64 and s.num_classes == 10 and len(s) == 1797


def test_mnist_reads_torchvision_layout(mnist_dir):
    s = data.mnist(mnist_dir, train=False, download=False)
    assert s.images.shape == (10000, 1, 28, 28) and len(s) == 10000
    assert 0.0 <= float(s.images.min()) and float(s.images.max()) == 1.0
    assert torch.bincount(s.labels).tolist()[:2] == [980, 1135]  # the standard test split's class counts


def test_mnist_missing_is_one_clear_line(tmp_path):
    with pytest.raises(data.DataError, match=r"MNIST not found under .*GAAF_DATA_DIR"):
        data.mnist(tmp_path, download=False)


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv(data.ENV, str(tmp_path))
    assert data.data_dir() == tmp_path
    assert data.data_dir("/x") == data.Path("/x")
    monkeypatch.delenv(data.ENV)
    assert data.data_dir() == data.DEFAULT_DIR


def test_an_unreadable_image_is_named(tmp_path):
    """PIL says "image file is truncated" or "cannot identify image file"; which of thousands is the question."""
    from PIL import Image

    noise = (torch.rand(20, 24, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    Image.fromarray(noise).save(tmp_path / "good.png")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "cut.png").write_bytes((tmp_path / "good.png").read_bytes()[:200])
    assert data.read_image(str(tmp_path / "good.png")).size == (24, 20)
    with pytest.raises(
        data.DataError, match=r"cannot read the image .*text\.png \(UnidentifiedImageError: .*remove it"
    ):
        data.read_image(str(tmp_path / "text.png"))
    with pytest.raises(data.DataError, match=r"cannot read the image .*cut\.png \(OSError: .*\); replace or remove it"):
        data.read_image(str(tmp_path / "cut.png"))
