import json
from pathlib import Path

import pytest
import torch

from llm.errors import UsageError
from llm.training.core.registry import resolve_task
from llm.training.core.resume import (
    ResumableSampler,
    SeededBatches,
    batches_done_in_epoch,
    change,
    check_changes,
    config_changes,
    course_changes,
    keep_optimizer_settings,
    mixed_seed,
    rng_state,
    set_rng_state,
)


def test_mixed_seeds_differ_for_every_rank_and_salt_the_engine_gives():
    # the training loader's salt is -1 - epoch: hash() of the numbers gave epochs 0 and 1 one seed (hash(-1) is -2)
    seeds = [mixed_seed(3, rank, 4, salt) for rank in range(4) for salt in range(-50, 50)]
    assert len(set(seeds)) == len(seeds) and all(0 <= seed < 2**63 for seed in seeds)
    assert mixed_seed(3, 0, 4, -1) == mixed_seed(3, 0, 4, -1) != mixed_seed(3, 0, 4, -2)
    # every other seed is the one earlier versions drew: a run resumed across the change draws as it did
    assert [mixed_seed(3, 0, salt) for salt in range(-50, 50) if salt != -2] == \
        [hash((3, 0, salt)) % 2**63 for salt in range(-50, 50) if salt != -2]


def test_the_position_in_an_epoch_converts_across_processes_and_batch_sizes():
    progress = {"batch_in_epoch": 6, "world_size": 2}  # 6 batches of 8 on each of 2 ranks: 96 samples done
    assert batches_done_in_epoch(progress, 8, 8, 2) == 6
    assert batches_done_in_epoch(progress, 8, 16, 1) == 6
    assert batches_done_in_epoch(progress, 8, 4, 4) == 6
    assert batches_done_in_epoch(progress, 8, 32, 1) == 3
    with pytest.warns(UserWarning, match="1 process.* of batch 10: 6 samples of the epoch are seen again"):
        assert batches_done_in_epoch(progress, 8, 10, 1) == 9


def test_a_stream_loaded_by_workers_is_left_as_it_is():
    class Stream(torch.utils.data.IterableDataset):  # its workers fetch no batch of indices: nothing to seed
        def __iter__(self):
            return iter(range(4))

    loader = torch.utils.data.DataLoader(Stream(), batch_size=2, num_workers=1)
    assert SeededBatches.install(loader, seed=0) is None and type(loader.batch_sampler) is torch.utils.data.BatchSampler
    assert loader.worker_init_fn is None


def test_loader_workers_changed_from_or_to_none_say_the_run_is_no_longer_exact():
    # with workers a data set's random numbers come from each batch's seed; without, from the main process
    assert change("data.num_workers", {"data.num_workers": 2}, {"data.num_workers": 4}) == "data.num_workers (2 -> 4)"
    for before, after in ((0, 2), (2, 0)):
        said = change("data.num_workers", {"data.num_workers": before}, {"data.num_workers": after})
        assert said.startswith(f"data.num_workers ({before} -> {after}; what a data set draws at random")
        assert said.endswith("not bit for bit as it would have)")


def test_config_changes_lists_what_changed_and_refuses_what_binds_unless_allowed():
    saved = {"task": "lm", "training.epochs": 2, "data.num_workers": 0, "world_size": 1, "checkpoint.resume": "",
             "checkpoint.allow_config_change": True}
    now = {**saved, "training.epochs": 4, "data.num_workers": 2, "checkpoint.resume": "auto",
           "checkpoint.allow_config_change": False}  # how to resume is no change of the run
    assert config_changes(saved, now) == ["data.num_workers", "training.epochs"]
    check_changes(config_changes(saved, now), allowed=False, path=Path("ckpt"))  # nothing that binds
    binding = config_changes(saved, {**now, "world_size": 2, "model.n_layer": 6})
    with pytest.raises(UsageError, match=r"cannot resume ckpt: model\.n_layer, world_size changed"):
        check_changes(binding, allowed=False, path=Path("ckpt"))
    check_changes(binding, allowed=True, path=Path("ckpt"))
    with pytest.raises(UsageError, match=r"cannot resume ckpt: tokenizer\.json \(as this run builds it\) changed"):
        check_changes([], allowed=False, path=Path("ckpt"), files=["tokenizer.json"])


def test_a_count_or_width_given_as_what_its_0_stands_for_is_no_change():
    saved = {"model.n_head": 4, "model.n_embd": 128, "model.n_kv_head": 0, "model.head_size": 0}
    same = {**saved, "model.n_kv_head": 4, "model.head_size": 32}  # 4 key-value heads, 128 / 4 wide: the defaults
    assert config_changes(saved, same) == [] and config_changes(same, saved) == []
    assert config_changes(saved, {**saved, "model.n_kv_head": 2, "model.head_size": 64}) == \
        ["model.head_size", "model.n_kv_head"]
    # twice the heads: that is the change, however the other two are given
    assert config_changes(saved, {**same, "model.n_head": 8}) == ["model.n_head"]
    assert config_changes(saved, {**saved, "model.n_head": 8}) == ["model.n_head"]


def test_a_file_that_differs_is_named_unless_a_changed_setting_explains_it():
    from llm.training.core.resume import unexplained

    files = ["corpus.json", "tokenizer.json", "model_config.json"]
    assert unexplained(files, ["data.path"]) == ["model_config.json"]
    assert unexplained(files, ["data.vocab_size"]) == ["corpus.json"]  # the tokenizer's, and the embedding's size
    assert unexplained(files, ["data.val_fraction"]) == files  # the split moves, not the corpus's text
    assert unexplained(files, ["training.batch_size", "world_size"]) == files
    assert unexplained(files, ["model.n_head"]) == ["corpus.json", "tokenizer.json"]
    assert unexplained(files, ["task"]) == [] and unexplained(["notes.txt"], ["data.path"]) == ["notes.txt"]


def test_a_changed_schedule_takes_this_runs_rates_at_the_resumed_step():
    def optimizer_and_schedule(t_max):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, weight_decay=0.0)
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)

    uninterrupted, schedule = optimizer_and_schedule(20)
    for _ in range(7):
        uninterrupted.step()
        schedule.step()
    # a run saved at step 7 with T_max=10 and weight decay 0.5, resumed with T_max=20 and no decay
    saved, old = optimizer_and_schedule(10)
    saved.param_groups[0]["weight_decay"] = 0.5
    for _ in range(7):
        saved.step()
        old.step()
    resumed, new = optimizer_and_schedule(20)
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in resumed.param_groups]
    resumed.load_state_dict(saved.state_dict())  # brings back the saved rate and weight decay
    keep_optimizer_settings(resumed, fresh, new, step=7)
    assert resumed.param_groups[0]["lr"] == pytest.approx(uninterrupted.param_groups[0]["lr"], rel=1e-12)
    assert resumed.param_groups[0]["weight_decay"] == 0.0
    assert new.state_dict() == schedule.state_dict()  # its count of calls too: the next checkpoint's is the same
    # a LambdaLR jumps to the step, which counted one call where an uninterrupted run counts one a step
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    jumped = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    keep_optimizer_settings(optimizer, [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
                            jumped, step=7)
    stepped = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1),
                                                lambda step: 1 / (1 + step))
    for _ in range(7):
        stepped.optimizer.step()
        stepped.step()
    assert jumped.last_epoch == stepped.last_epoch and jumped._step_count == stepped._step_count


def test_resumable_sampler_skips_indices_already_trained_on():
    loader = torch.utils.data.DataLoader(list(range(10)), batch_size=3)
    sampler = ResumableSampler.install(loader, loader.batch_sampler.sampler)
    sampler.skip = 4
    assert [batch.tolist() for batch in loader] == [[4, 5, 6], [7, 8, 9]] and len(loader) == 2
    sampler.skip = 0
    assert len(list(loader)) == 4
    other = torch.utils.data.DataLoader(list(range(10)), batch_size=3)
    assert ResumableSampler.install(other, torch.utils.data.SequentialSampler(range(10))) is None


def test_a_setting_newer_than_the_checkpoint_counts_as_saved_at_its_default():
    from llm.training.core.callbacks import flatten
    from llm.training.core.config import Config
    from llm.training.core.resume import config_changes, with_defaults

    now = flatten(Config().to_dict())
    saved = {k: v for k, v in now.items() if k != "training.tf32"}  # a checkpoint from before the setting
    assert config_changes(with_defaults(saved, Config()), now) == []
    assert config_changes(with_defaults(saved, Config()), {**now, "training.tf32": True}) == ["training.tf32"]
    from llm.training.core.resume import change  # and shown so: not as None

    assert change("training.tf32", with_defaults(saved, Config()), {**now, "training.tf32": True}) == \
        "training.tf32 (False -> True)"


def test_a_class_of_a_script_run_as_main_that_is_not_running_is_named_in_one_line():
    with pytest.raises(UsageError, match=r"task '__main__:SineTask' is a class of a script run as __main__ .*"
                                         r"name it by its module, module:SineTask"):
        resolve_task("__main__:SineTask")


def test_a_go_back_command_run_again_goes_back_once_more_only_for_another_course():
    changed = ["training.max_steps", "training.device", "logging.log_every_steps", "checkpoint.keep_last",
               "data.num_workers", "optimizer.lr", "model.n_layer", "training.grad_clip"]
    assert course_changes(changed) == ["optimizer.lr", "model.n_layer", "training.grad_clip"]


def test_a_data_file_named_otherwise_is_no_change_and_a_refusal_shows_the_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("text")
    (tmp_path / "link.txt").symlink_to(tmp_path / "corpus.txt")
    saved = {"data.path": "corpus.txt", "data.tokenizer": "char", "world_size": 1}
    for same in ("./corpus.txt", str(tmp_path / "corpus.txt"), "link.txt", "sub/../corpus.txt"):
        assert config_changes(saved, {**saved, "data.path": same}) == [], same
    moved = {**saved, "data.path": "other.txt"}
    assert config_changes(saved, moved) == ["data.path"]
    with pytest.raises(UsageError, match=r"^cannot resume ckpt: data.path \('corpus.txt' -> 'other.txt'\) changed"):
        check_changes(["data.path"], allowed=False, path=Path("ckpt"), saved=saved, now=moved)


def test_a_run_of_a_script_resumed_from_the_command_line_is_told_why_its_classes_count_as_changed():
    saved, now = {"task": "__main__:SineTask"}, {"task": "sine:SineTask"}
    assert change("task", saved, now) == (
        "task ('__main__:SineTask' -> 'sine:SineTask'; a class of the script that trained, run as __main__, which no "
        "other process can name: if this is the same class, resume anyway as said below, and import it into that "
        "script from now on)")
    assert change("task", {"task": "lm"}, now) == "task ('lm' -> 'sine:SineTask')"


def test_a_bpe_tokenizer_that_differs_is_put_down_to_another_version_only_when_both_hold_the_same_corpus(tmp_path):
    from types import SimpleNamespace

    from llm.training.core.resume import RETRAINED_OTHERWISE, changed_artifacts

    class Task:  # a language model's artifacts, as this run would write them
        config = SimpleNamespace(data=SimpleNamespace(tokenizer="bpe"))

        def __init__(self, corpus):
            self.corpus = corpus

        def save_artifacts(self, directory):
            (directory / "tokenizer.json").write_text('{"merges": ["a b"]}')
            if self.corpus:
                (directory / "corpus.json").write_text(json.dumps({"sha256": self.corpus}))

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "tokenizer.json").write_text('{"merges": ["b c"]}')
    assert changed_artifacts(Task("abc"), checkpoint) == ["tokenizer.json"]  # a checkpoint without corpus.json
    (checkpoint / "corpus.json").write_text(json.dumps({"sha256": "abc"}))
    assert changed_artifacts(Task("abc"), checkpoint) == [RETRAINED_OTHERWISE]
    assert changed_artifacts(Task("abd"), checkpoint) == ["corpus.json", "tokenizer.json"]  # an edited corpus


def test_a_gpu_process_keeps_the_random_state_of_its_own_gpu_and_finds_it_in_older_checkpoints(monkeypatch):
    # each GPU's state a tensor of its index; a process saves and restores only the one it trains on
    states = {i: torch.tensor([i], dtype=torch.uint8) for i in range(4)}
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: states[device.index])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state), device.index)))
    gpu = torch.device("cuda", 2)
    saved = rng_state(gpu)
    assert torch.equal(saved["cuda"], states[2]) and "cuda" not in rng_state(torch.device("cpu"))
    set_rng_state(saved, gpu)
    set_rng_state({**saved, "cuda": [states[i] for i in range(4)]}, gpu)  # an earlier version's: every GPU's
    set_rng_state(saved, torch.device("cpu"))  # a GPU run resumed on the CPU: nothing to restore there
    assert restored == [(2, 2), (2, 2)]
    with pytest.warns(UserWarning, match="random state of 2 GPUs, none for cuda:2"):  # saved where fewer were seen
        set_rng_state({**saved, "cuda": [states[0], states[1]]}, gpu)
    assert len(restored) == 2
