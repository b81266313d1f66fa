import torch

from llm.data.synthetic_data_module import SyntheticDataModule
from llm.training.core.config import Config


def made(**data) -> SyntheticDataModule:
    dm = SyntheticDataModule(Config.from_dict({"data": data}))
    dm.setup("fit")
    return dm


def fitted(dm: SyntheticDataModule) -> torch.Tensor:
    """The line through the training set by least squares, bias last."""
    x, y = dm.train_set.tensors
    return torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], 1).double(), y.double()).solution


def test_the_split_holds_every_sample_once_and_a_test_set_as_large_as_validation():
    dm = made(num_samples=200, val_fraction=0.25)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (150, 50, 50)
    assert dm.train_set.tensors[0].shape == (150, 16) and dm.train_set.tensors[1].shape == (150, 1)


def test_the_seed_makes_the_data_and_the_function_stays_the_same_for_any_number_of_samples():
    first, again = made(num_samples=64, noise=0.0), made(num_samples=64, noise=0.0)
    assert all(torch.equal(a, b) for a, b in zip(first.train_set.tensors, again.train_set.tensors))
    # a learning curve over data.num_samples: one function to learn, whatever the number of samples
    more = made(num_samples=512, noise=0.0)
    torch.testing.assert_close(fitted(first), fitted(more))
    other = SyntheticDataModule(Config.from_dict({"data": {"num_samples": 64, "noise": 0.0}, "training": {"seed": 1}}))
    other.setup("fit")
    assert not torch.allclose(fitted(first), fitted(other))
