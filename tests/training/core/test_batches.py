import dataclasses

import torch

from llm.training.core.batches import batch_len, moved_to


def test_batches_are_counted_and_moved_whatever_holds_their_tensors():
    from collections import UserDict, namedtuple

    assert batch_len({"id": ["a", "b", "c"], "x": torch.zeros(3, 2)}) == 3  # names first
    assert batch_len((["a"] * 5, {"scale": torch.tensor(2.0), "x": torch.zeros(5)})) == 5
    assert batch_len(["just", "text"]) == 1
    Pair = namedtuple("Pair", "x y")
    moved = moved_to([Pair(torch.ones(2), torch.ones(2)), UserDict(x=torch.ones(2))], torch.device("meta"))
    assert type(moved[0]) is Pair and moved[0].y.device.type == "meta"
    assert type(moved[1]) is UserDict and moved[1]["x"].device.type == "meta"

    @dataclasses.dataclass(frozen=True)
    class Batch:
        ids: list[str]
        x: torch.Tensor
        scale: float = 1.0
        y: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(4))

    batch = Batch(["a"] * 4, torch.ones(4, 3), 2.0)
    assert batch_len(batch) == 4 and batch_len([batch]) == 4
    moved = moved_to({"b": batch}, torch.device("meta"))["b"]
    assert type(moved) is Batch and moved.x.device.type == moved.y.device.type == "meta"
    assert moved.ids == ["a"] * 4 and moved.scale == 2.0 and batch.x.device.type == "cpu"

    @dataclasses.dataclass
    class Shifted:  # __init__ and __post_init__ run once, when the loader makes the batch, not again when moved
        x: torch.Tensor
        scale: dataclasses.InitVar[float]
        mask: torch.Tensor | None = dataclasses.field(init=False, default=None)
        later: torch.Tensor = dataclasses.field(init=False)  # set by the collate function, or not at all

        def __post_init__(self, scale):
            self.x = self.x * scale - 1

    batch = Shifted(torch.ones(3, 2), 2.0)
    assert batch_len(batch) == 3  # its unset field passed over
    batch.mask = torch.ones(3, dtype=torch.bool)
    moved = moved_to(batch, torch.device("meta"))
    assert moved.x.device.type == moved.mask.device.type == "meta" and not hasattr(moved, "later")
    assert torch.equal(moved_to(batch, torch.device("cpu")).x, torch.ones(3, 2))
