from llm.data.classification_data_module import ClassificationDataModule
from llm.training.core.config import Config


def test_loaders_follow_the_data_and_training_settings():
    config = Config.from_dict({"task": "classification", "data": {"num_workers": 2, "num_samples": 200},
                               "training": {"batch_size": 8}})
    dm = ClassificationDataModule(config)
    dm.setup()
    (train, train_sampler), (val, _) = dm.train_dataloader(0, 2), dm.val_dataloader(0, 2)
    assert train.num_workers == val.num_workers == 2 and train.batch_size == val.batch_size == 8
    assert len(dm.train_set) + len(dm.val_set) == 200 and train_sampler.num_replicas == 2
    features, labels = next(iter(train))  # through the worker processes
    assert features.shape == (8, config.data.input_dim) and labels.shape == (8,)


def test_validation_shards_cover_every_item_once_however_many_ranks():
    from llm.data.data_module import ShardSampler

    data = list(range(5))  # 5 items on 2 ranks: a DistributedSampler would give rank 1 item 0 again
    shards = [list(ShardSampler(data, num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)]
    assert shards == [[0, 2, 4], [1, 3]] and [len(ShardSampler(data, num_replicas=2, rank=r)) for r in (0, 1)] == [3, 2]
