"""MNIST-1D example dataset and the example teacher/student models."""

from __future__ import annotations

import mnist1d.data
import numpy as np
import pytest
import torch

from kdcache.pipeline.examples.mnist1d import MNIST1D
from kdcache.pipeline.examples.models import StudentCNN, StudentMLP, TeacherCNN, num_parameters

N_TRANSFER = 500


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    # Shared across the module so the standard 5,000-sample generation (~2 s) happens once.
    return tmp_path_factory.mktemp("mnist1d")


@pytest.fixture(scope="module")
def splits(cache_dir):
    return {
        s: MNIST1D(s, num_transfer=N_TRANSFER, cache_dir=cache_dir)
        for s in ("train", "test", "transfer", "train+transfer")
    }


def test_split_sizes_and_labels(splits):
    assert [len(splits[s]) for s in ("train", "test", "transfer", "train+transfer")] == [
        4000,
        1000,
        N_TRANSFER,
        4000 + N_TRANSFER,
    ]
    for s in ("train", "test"):
        labels = splits[s].labels
        assert labels.dtype == np.int64 and labels.min() >= 0 and labels.max() <= 9
        assert len(np.unique(labels)) == 10
    assert (splits["transfer"].labels == -1).all()
    both = splits["train+transfer"]
    np.testing.assert_array_equal(both.labels[:4000], splits["train"].labels)
    np.testing.assert_array_equal(both.inputs[:4000], splits["train"].inputs)
    np.testing.assert_array_equal(both.inputs[4000:], splits["transfer"].inputs)
    assert (both.labels[4000:] == -1).all()
    for ds in splits.values():
        assert ds.inputs.shape == (len(ds), 40) and ds.inputs.dtype == np.float32
        assert ds.num_classes == 10


def test_train_and_test_are_the_standard_mnist1d(splits):
    ref = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    np.testing.assert_array_equal(splits["train"].inputs, ref["x"].astype(np.float32))
    np.testing.assert_array_equal(splits["train"].labels, ref["y"])
    np.testing.assert_array_equal(splits["test"].inputs, ref["x_test"].astype(np.float32))
    np.testing.assert_array_equal(splits["test"].labels, ref["y_test"])


def test_transfer_is_fresh_data_and_seed_changes_it(splits, cache_dir):
    transfer = splits["transfer"].inputs
    train = splits["train"].inputs
    # No transfer row may coincide with a train row (would leak labeled data into transfer).
    dists = ((transfer[:, None, :] - train[None, :1000, :]) ** 2).sum(-1)
    assert dists.min() > 1e-3
    other = MNIST1D("transfer", seed=7, num_transfer=N_TRANSFER, cache_dir=cache_dir)
    assert not np.allclose(other.inputs, transfer)


def test_odd_num_transfer_is_exact(cache_dir):
    ds = MNIST1D("transfer", num_transfer=123, cache_dir=cache_dir)
    assert len(ds) == 123


def test_getitem_types(splits):
    x, y = splits["train"][0]
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (40,)
    assert type(y) is int and 0 <= y <= 9
    item = splits["transfer"][3]
    assert isinstance(item, dict) and set(item) == {"input"}
    assert item["input"].dtype == torch.float32 and item["input"].shape == (40,)
    both = splits["train+transfer"]
    assert isinstance(both[3999], tuple) and isinstance(both[4000], dict)


def test_get_batch_matches_getitem(splits):
    ds = splits["train+transfer"]
    ids = np.array([0, 3999, 4000, 17, len(ds) - 1, 4001, 5])
    batch = ds.get_batch(ids)
    assert batch["input"].shape == (len(ids), 40) and batch["input"].dtype == np.float32
    assert batch["label"].shape == (len(ids),) and batch["label"].dtype == np.int64
    for row, i in enumerate(ids):
        item = ds[int(i)]
        if isinstance(item, dict):
            x, y = item["input"], -1
        else:
            x, y = item
        np.testing.assert_array_equal(batch["input"][row], x.numpy())
        assert batch["label"][row] == y


def test_dataset_is_read_only(splits):
    ds = splits["train"]
    with pytest.raises(ValueError):
        ds.inputs[0, 0] = 1.0
    x, _ = ds[0]
    x += 1  # a returned sample is a copy
    assert not np.array_equal(ds.inputs[0], x.numpy())


def test_disk_cache_is_reused(splits, cache_dir, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("regenerated despite a cache hit")

    monkeypatch.setattr(mnist1d.data, "make_dataset", boom)
    again = MNIST1D("train+transfer", num_transfer=N_TRANSFER, cache_dir=cache_dir)
    np.testing.assert_array_equal(again.inputs, splits["train+transfer"].inputs)
    # Different generation args must miss the cache (proves the patch is what gets called).
    with pytest.raises(AssertionError, match="regenerated"):
        MNIST1D("transfer", seed=3, num_transfer=N_TRANSFER, cache_dir=cache_dir)
    assert not list(cache_dir.glob("*.tmp")), "atomic write left a temp file behind"


def test_env_cache_dir_and_global_rng_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCACHE_DATA_DIR", str(tmp_path))
    np.random.seed(0)
    expected = np.random.rand()
    np.random.seed(0)
    MNIST1D("transfer", seed=11, num_transfer=50)  # generates, which reseeds numpy internally
    assert np.random.rand() == expected
    assert len(list(tmp_path.glob("mnist1d_*.npz"))) == 1


def test_concurrent_generation_is_deterministic(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    def build(i):
        return MNIST1D("transfer", seed=5, num_transfer=300, cache_dir=tmp_path / str(i)).inputs

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(build, range(4)))
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


def test_bad_arguments(cache_dir):
    with pytest.raises(ValueError, match="split"):
        MNIST1D("validation", cache_dir=cache_dir)
    with pytest.raises(ValueError, match="num_transfer"):
        MNIST1D("transfer", num_transfer=0, cache_dir=cache_dir)


MODELS = [
    (TeacherCNN, "features", (128, 10)),
    (StudentCNN, "features", (16, 10)),
    (StudentMLP, "hidden", (100,)),
]


@pytest.mark.parametrize(("cls", "layer", "feat_shape"), MODELS)
def test_model_shapes_and_feature_layer(cls, layer, feat_shape):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(5, 40)
    seen = {}
    getattr(model, layer).register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    logits = model(x)
    assert logits.shape == (5, 10)
    assert seen["out"].shape == (5, *feat_shape)
    assert model.feature_dim == feat_shape[0]
    torch.testing.assert_close(model(x.unsqueeze(1)), logits)
    # Stage one relies on the head consuming exactly the hooked layer's output.
    inner = x if layer == "hidden" else x.unsqueeze(1)
    torch.testing.assert_close(model.head(getattr(model, layer)(inner)), logits)
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(5, 2, 40))


@pytest.mark.parametrize(("cls", "layer", "feat_shape"), MODELS)
def test_model_init_is_deterministic_and_trainable(cls, layer, feat_shape):
    torch.manual_seed(3)
    a = cls()
    torch.manual_seed(3)
    b = cls()
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    loss = torch.nn.functional.cross_entropy(a(torch.randn(8, 40)), torch.arange(8))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in a.parameters())


def test_model_sizes_and_options():
    teacher = num_parameters(TeacherCNN())
    assert teacher > 5 * num_parameters(StudentMLP()) > 5 * num_parameters(StudentCNN())
    deep = StudentMLP(hidden=32, depth=3)
    assert sum(isinstance(m, torch.nn.Linear) for m in deep.hidden) == 3
    assert deep(torch.randn(2, 40)).shape == (2, 10)
    assert TeacherCNN(num_classes=7, channels=8)(torch.randn(2, 40)).shape == (2, 7)
    with pytest.raises(ValueError, match="depth"):
        StudentMLP(depth=0)


def _fit(model, ds_train, ds_test, epochs, lr):
    x, y = torch.tensor(ds_train.inputs), torch.tensor(ds_train.labels)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    steps = epochs * -(-len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    for _ in range(epochs):
        model.train()
        for ids in torch.randperm(len(x)).split(128):
            loss = torch.nn.functional.cross_entropy(model(x[ids]), y[ids])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        pred = model(torch.tensor(ds_test.inputs)).argmax(1).numpy()
    return float((pred == ds_test.labels).mean())


@pytest.mark.slow
def test_documented_accuracies(splits):
    """The recipe in the models docstring (~20 s on 2 cores)."""
    torch.manual_seed(0)
    assert _fit(TeacherCNN(), splits["train"], splits["test"], 30, 3e-3) >= 0.94
    torch.manual_seed(0)
    assert 0.55 <= _fit(StudentMLP(), splits["train"], splits["test"], 100, 1e-2) <= 0.72


def test_standard_args_are_the_packages_defaults():
    from mnist1d.data import get_dataset_args

    from kdcache.pipeline.examples.mnist1d import STANDARD_ARGS

    defaults = get_dataset_args(as_dict=True)
    defaults.pop("url", None)
    assert defaults == STANDARD_ARGS
