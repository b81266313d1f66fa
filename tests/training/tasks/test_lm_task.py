import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from llm.data.synthetic_data_module import SyntheticDataModule
from llm.data.text_data_module import TextDataModule
from llm.data.tokenizers import CharTokenizer, load_tokenizer
from llm.errors import UsageError
from llm.models.gpt import GPT, GPTConfig
from llm.training.core.config import Config
from llm.training.core.registry import resolve_data_module, resolve_task
from llm.training.tasks import lm_task
from llm.training.tasks.lm_task import IGNORE_INDEX, LMTask, load_lm
from tests.helpers import reseal, train_tiny_lm

TEXT = "".join(f"{w} sat on the mat. " for w in ("the cat", "a dog", "my hat", "one bat") * 60)


@pytest.fixture
def task(tmp_path) -> LMTask:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    config = Config.from_dict({
        "task": "lm",
        "data": {"path": str(corpus), "cache_dir": str(tmp_path / "cache"), "tokenizer": "char"},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16},
        "training": {"batch_size": 8, "seed": 0},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.0, "scheduler": "constant"},
    })
    task = LMTask(config)
    data = TextDataModule(config)
    data.prepare_data()
    data.setup()
    task.data_module, task.total_steps = data, 40
    return task


def test_the_registry_names_lm_and_text():
    assert resolve_task("lm") is LMTask and resolve_data_module("text") is TextDataModule
    assert LMTask.default_data_module == "text"


def test_the_model_follows_the_config_and_the_tokenizer(task):
    torch.manual_seed(0)
    model = task.build_model()
    assert isinstance(model, GPT) and task.tokens_per_sample == 16
    vocab = task.data_module.tokenizer.vocab_size
    assert model.config == GPTConfig(vocab_size=vocab, block_size=16, n_layer=2, n_head=2, n_embd=32)
    task.config.model.qk_norm, task.config.model.head_size = True, 12  # each model setting reaches it by its name
    normed = task.build_model()
    assert normed.config.qk_norm and normed.blocks[0].attn.q_norm.weight.shape == (12,)
    assert normed.blocks[0].attn.proj.weight.shape == (32, 2 * 12)


def test_model_vocab_size_pads_the_vocabulary_and_may_not_cut_it(task):
    vocab = task.data_module.tokenizer.vocab_size
    task.config.model.vocab_size = 64
    model = task.build_model()
    assert model.config.vocab_size == 64 > vocab and model.lm_head.weight.shape == (64, 32)
    x, y = next(iter(task.data_module.train_dataloader(0, 1)[0]))
    loss, _ = task.train_step((x, y), model, task.build_criterion())
    assert math.isfinite(loss.item())
    task.config.model.vocab_size = vocab - 1
    with pytest.raises(UsageError, match=rf"model.vocab_size: got {vocab - 1}, fewer than the tokenizer's {vocab} "):
        task.build_model()


def test_a_gpt_the_config_could_not_check_is_refused_naming_the_setting(task):
    """The config checks a GPT's settings for task lm; the task named by its path, or a custom task's GPT, gets
    GPTConfig's own check, which named another setting's remedy."""
    task.config.model.n_kv_head = 3
    with pytest.raises(UsageError) as refused:
        task.build_model()
    assert str(refused.value) == "model.n_head (2) must be a multiple of n_kv_head (3)"


def test_steps_return_next_token_cross_entropy(task):
    torch.manual_seed(0)
    model, criterion = task.build_model(), task.build_criterion()
    x, y = next(iter(task.data_module.train_dataloader(0, 1)[0]))
    loss, metrics = task.train_step((x, y), model, criterion)
    assert metrics == {} and loss.shape == ()
    logits = model(x)
    manual = -torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).mean()
    torch.testing.assert_close(loss, manual)
    val_loss, _ = task.validation_step((x, y), model, criterion)
    torch.testing.assert_close(val_loss, loss)
    assert loss.item() == pytest.approx(math.log(task.data_module.tokenizer.vocab_size), abs=0.3)


def test_ignored_targets_leave_the_loss_and_a_batch_of_only_padding_weighs_nothing(task):
    torch.manual_seed(0)
    model, criterion = task.build_model(), task.build_criterion()
    x, y = next(iter(task.data_module.train_dataloader(0, 1)[0]))
    half = y.clone()
    half[:, 8:] = IGNORE_INDEX
    logits = model(x)
    manual = -torch.log_softmax(logits[:, :8], -1).gather(-1, y[:, :8].unsqueeze(-1)).mean()
    torch.testing.assert_close(task.train_step((x, half), model, criterion)[0], manual)
    assert int(task.loss_weight((x, half))) == y.shape[0] * 8

    padding = torch.full_like(y, IGNORE_INDEX)  # a micro-batch of nothing but padding: 0/0 as a plain mean
    loss, _ = task.train_step((x, padding), model, criterion)
    loss.backward()
    assert loss.item() == 0.0 and int(task.loss_weight((x, padding))) == 0
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())


def test_a_few_optimizer_steps_lower_the_loss(task):
    torch.manual_seed(0)
    model = task.build_model()
    optimizer = task.build_optimizer(model)
    scheduler = task.build_scheduler(optimizer)
    criterion = task.build_criterion()
    loader, sampler = task.data_module.train_dataloader(0, 1)
    losses = []
    sampler.set_epoch(0)
    for batch, _ in zip(loader, range(30)):
        loss, _ = task.train_step(batch, model, criterion)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    model.eval()
    val = [task.validation_step(b, model, criterion)[0].item() for b in task.data_module.val_dataloader(0, 1)[0]]
    assert sum(val) / len(val) < losses[0] - 1.0


def test_finalize_metrics_adds_perplexity(task):
    metrics = {"loss": 2.0, "val_loss": 1.5, "lr": 0.1}
    out = task.finalize_metrics(metrics)
    assert out == {"loss": 2.0, "val_loss": 1.5, "lr": 0.1, "ppl": pytest.approx(math.exp(2.0)),
                   "val_ppl": pytest.approx(math.exp(1.5))}
    assert "ppl" not in metrics  # the caller's dict is left alone
    assert task.finalize_metrics({"val_loss": 1e4}) == {"val_loss": 1e4, "val_ppl": math.inf}
    assert math.isnan(task.finalize_metrics({"loss": math.nan})["ppl"])  # no loss to exponentiate: not infinity
    assert task.finalize_metrics({"lr": 0.1}) == {"lr": 0.1}


def test_artifacts_rebuild_the_model_and_its_tokenizer(task, tmp_path):
    model = task.build_model()
    out = tmp_path / "artifacts"
    task.save_artifacts(out)
    assert sorted(p.name for p in out.iterdir()) == ["corpus.json", "model_config.json", "tokenizer.json"]
    assert json.loads((out / "corpus.json").read_text()) == {"sha256": task.data_module.corpus_digest,
                                                             "tokens_sha256": task.data_module.tokens_digest}
    tokenizer = load_tokenizer(out / "tokenizer.json")
    assert tokenizer.fingerprint() == task.data_module.tokenizer.fingerprint()
    config = GPTConfig.from_dict(json.loads((out / "model_config.json").read_text()))
    assert config == model.config
    clone = GPT(config)
    clone.load_state_dict(model.state_dict())
    x = torch.tensor([tokenizer.encode("the cat sat")])
    torch.testing.assert_close(clone(x), model(x))


def test_building_without_a_text_data_module_fails_clearly(task):
    task.data_module = None
    with pytest.raises(RuntimeError, match="data_module"):
        task.build_model()
    task.data_module = SyntheticDataModule(task.config)
    with pytest.raises(UsageError, match="needs a data module with a tokenizer.*SyntheticDataModule"):
        task.build_model()


def test_a_resume_on_the_same_corpus_tokenized_otherwise_is_refused_naming_the_version(tmp_path, monkeypatch):
    # another version of the package that cuts or reads the text otherwise (simulated: one token more at the start)
    from llm.data import text_data_module as tdm
    from llm.training.core.engine import TrainingEngine
    from llm.training.core.resume import TOKENIZED_OTHERWISE

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)

    def train(folder, steps):
        config = Config.from_dict({
            "task": "lm", "data": {"path": str(corpus), "cache_dir": str(tmp_path / "cache")},
            "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16},
            "training": {"batch_size": 8, "max_steps": steps, "epochs": 1},
            "logging": {"log_dir": str(tmp_path / folder), "progress_bar": False}, "checkpoint": {"resume": "auto"},
        })
        return TrainingEngine(config, LMTask(config)).train()

    train("pinned", 3)
    with monkeypatch.context() as earlier:  # a version whose checkpoints pin no tokens
        setup = tdm.TextDataModule.setup

        def pinning_no_tokens(self, stage=None):
            setup(self, stage)
            self.tokens_digest = None

        earlier.setattr(tdm.TextDataModule, "setup", pinning_no_tokens)
        train("earlier", 3)
    real = tdm._without_bom
    monkeypatch.setattr(tdm, "CACHE_FORMAT", "another")
    monkeypatch.setattr(tdm, "_without_bom", lambda blocks: (TEXT[0] + b if i == 0 else b
                                                             for i, b in enumerate(real(blocks))))
    with pytest.raises(UsageError) as refused:
        train("pinned", 5)
    assert f"step_00000003: {TOKENIZED_OTHERWISE} changed" in str(refused.value), str(refused.value)
    assert train("earlier", 5)["steps"] == 5  # resumed as it was, on the corpus's digest alone


@pytest.mark.filterwarnings("ignore:data.vocab_size")  # a corpus too small for the vocabulary asked
def test_a_resume_whose_bpe_comes_out_otherwise_from_the_same_corpus_says_so_and_how_to_keep_it(tmp_path,
                                                                                                monkeypatch):
    # another version of the package whose BPE training gives another tokenizer (simulated: fewer merges)
    from llm.data import text_data_module as tdm
    from llm.data.tokenizers import HFTokenizer
    from llm.training.core.engine import TrainingEngine
    from llm.training.core.resume import RETRAINED_OTHERWISE

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 4)

    def train(steps, batch_size=8, tokenizer="bpe", allow=False):
        config = Config.from_dict({
            "task": "lm", "data": {"path": str(corpus), "cache_dir": str(tmp_path / "cache"), "tokenizer": tokenizer,
                                   "vocab_size": 300},
            "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "vocab_size": 320},
            "training": {"batch_size": batch_size, "max_steps": steps, "epochs": 1},
            "logging": {"log_dir": str(tmp_path / "run"), "progress_bar": False},
            "checkpoint": {"resume": "auto", "allow_config_change": allow},
        })
        return TrainingEngine(config, LMTask(config)).train()

    train(3)
    real = HFTokenizer.train_bpe.__func__
    monkeypatch.setattr(tdm, "CACHE_FORMAT", "another")
    monkeypatch.setattr(HFTokenizer, "train_bpe",
                        classmethod(lambda cls, texts, vocab, special=(): real(cls, texts, 260, special)))
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000003"
    keep = (f"(its weights would then read other tokens: to keep the tokenizer they were trained with, copy "
            f"{ckpt / 'tokenizer.json'} out of the run's folder and give it as --data-tokenizer too)")
    with pytest.raises(UsageError) as refused:
        train(5)
    assert f"step_00000003: {RETRAINED_OTHERWISE} changed" in str(refused.value), str(refused.value)
    assert str(refused.value).endswith(keep)
    # named beside a setting changed on purpose too (another batch size): not left to pass unseen with it
    with pytest.raises(UsageError) as refused:
        train(5, batch_size=4)
    assert f"step_00000003: training.batch_size (8 -> 4), {RETRAINED_OTHERWISE} changed" in str(refused.value)
    assert str(refused.value).endswith(keep)
    # the way out it names: the run goes on with the tokenizer its weights were trained with
    kept = tmp_path / "tokenizer.json"
    kept.write_bytes((ckpt / "tokenizer.json").read_bytes())
    assert train(5, tokenizer=str(kept), allow=True)["steps"] == 5
    assert json.loads((tmp_path / "run" / "checkpoints" / "step_00000005" / "tokenizer.json").read_text()) == \
        json.loads(kept.read_text())


@pytest.mark.parametrize("edited", ["corpus", "corpus, the same characters", "tokenizer file"])
def test_a_resume_on_an_edited_corpus_or_tokenizer_is_refused_unless_allowed(tmp_path, capsys, edited):
    from llm.training.core.engine import TrainingEngine

    corpus, tokenizer_file = tmp_path / "corpus.txt", tmp_path / "chars.json"
    corpus.write_text(TEXT)
    CharTokenizer(sorted({*TEXT, "\u00e9"})).save(tokenizer_file)
    tokenizer = {"tokenizer": str(tokenizer_file)} if edited == "tokenizer file" else {}

    def config(**checkpoint):
        return Config.from_dict({
            "task": "lm", "data": {"path": str(corpus), "cache_dir": str(tmp_path / "cache"), **tokenizer},
            "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16},
            "training": {"batch_size": 8, "max_steps": 3, "epochs": 1},
            "logging": {"log_dir": str(tmp_path / "run"), "progress_bar": False},
            "checkpoint": {"resume": "auto", **checkpoint},
        })

    def train(cfg):
        engine = TrainingEngine(cfg, LMTask(cfg))
        engine.train()
        return engine

    train(config())
    assert train(config()).step == 3  # the same corpus: the same tokenizer, nothing refused
    files = {"corpus": "corpus.json (as this run builds it), tokenizer.json (as this run builds it)",
             "corpus, the same characters": "corpus.json (as this run builds it)",  # the windows and split move
             "tokenizer file": "tokenizer.json (as this run builds it)"}[edited]
    if edited == "corpus":
        corpus.write_text(TEXT.replace("c", "\u00e9"))  # as many characters: only their meaning moves
    elif edited == "corpus, the same characters":
        corpus.write_text(TEXT + TEXT[:40])  # more of the same text
    else:
        CharTokenizer(sorted({*TEXT, "!"})).save(tokenizer_file)  # as many ids, "!" sorts first: every id moves
    capsys.readouterr()
    with pytest.raises(UsageError) as refused:
        train(config())
    assert f"step_00000003: {files} changed" in str(refused.value), str(refused.value)
    assert "--checkpoint-allow-config-change true to resume anyway" in str(refused.value)
    assert ("to keep the tokenizer they were trained with" in str(refused.value)) == ("tokenizer.json" in files)
    assert "resuming" not in capsys.readouterr().out  # a refused resume does not first announce itself
    assert train(config(allow_config_change=True)).step == 3


# ---- load_lm: a trained model back from its checkpoint ----------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run of a tiny char-level GPT, trained once for the load_lm tests."""
    root = tmp_path_factory.mktemp("lm")
    return train_tiny_lm(root, TEXT)


def test_load_lm_takes_a_run_a_folder_of_checkpoints_or_one_checkpoint(run_dir):
    step = run_dir / "checkpoints" / "step_00000030"
    loads = [load_lm(path) for path in (run_dir, run_dir / "checkpoints", step, str(step))]
    assert [ckpt for _, _, ckpt in loads] == [step] * 4
    model, tokenizer, _ = loads[0]
    assert isinstance(model, GPT) and not model.training
    assert model.config == GPTConfig.from_dict(json.loads((step / "model_config.json").read_text()))
    assert tokenizer.fingerprint() == load_tokenizer(run_dir / "tokenizer.json").fingerprint()
    saved = torch.load(step / "state.pt", weights_only=True)["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    x = torch.tensor([tokenizer.encode("the cat sat")])
    torch.testing.assert_close(loads[1][0](x), model(x))


def _drop_artifacts(ckpt: Path) -> None:
    (ckpt / "model_config.json").unlink()
    (ckpt / "tokenizer.json").unlink()


def _edit_config(**changes):
    def edit(ckpt: Path) -> None:
        path = ckpt / "model_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def _truncate_state(ckpt: Path) -> None:
    data = (ckpt / "state.pt").read_bytes()
    (ckpt / "state.pt").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("breakage, resealed, message", [
    (_drop_artifacts, True,
     r"\S+step_00000030 is not a language-model checkpoint \(no model_config.json or tokenizer.json; .*\)"),
    # more tokens than the model has rows (fewer would be a padded vocabulary)
    (lambda c: CharTokenizer("abcdefghijklmnopqrst").save(c / "tokenizer.json"), True,
     r"the vocabulary does not fit the model in \S+: tokenizer.json has 20 tokens, model_config.json says .* 15"),
    (_edit_config(n_embd=64), True,
     r"the weights in \S+ belong to a different model .*: size mismatch for tok_emb.weight: .* \(and \d+ more\)"),
    (_edit_config(n_layer=2), True,
     r"the weights in \S+ belong to a different model .*: Missing key\(s\) in state_dict: \"blocks\.1\..*"),
    (_edit_config(n_heads=4), True,
     r"\S+model_config.json is not a valid model config: unknown GPTConfig fields: n_heads"),
    (lambda c: (c / "model_config.json").write_text("[1, 2"), True,
     r"\S+model_config.json is not a valid model config: .*"),
    (lambda c: torch.save({"optimizer": {}}, c / "state.pt"), True, r"\S+state.pt holds no model weights.*"),
    (_truncate_state, True, r"\S+state.pt is truncated or corrupt \(.*\)"),
    (_truncate_state, False, r"checkpoint \S+ is not valid: state.pt has \d+ bytes, the manifest says \d+"),
])
def test_load_lm_names_what_is_wrong_in_one_line(run_dir, tmp_path, breakage, resealed, message):
    ckpt = tmp_path / "step_00000030"
    shutil.copytree(run_dir / "checkpoints" / ckpt.name, ckpt)
    breakage(ckpt)
    if resealed:
        reseal(ckpt)
    with pytest.raises(UsageError) as caught:
        load_lm(ckpt)
    assert "\n" not in str(caught.value)
    assert re.fullmatch(message, str(caught.value)), str(caught.value)


def test_load_lm_of_a_live_runs_folder_takes_the_newest_again_when_the_one_it_reads_is_pruned(run_dir, tmp_path,
                                                                                             monkeypatch):
    folder = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "checkpoints" / "step_00000030", folder / "step_00000030")
    read = lm_task.model_weights

    def saved_and_pruned(ckpt):  # meanwhile the run saves step 40, and its retention deletes step 30
        if ckpt.name == "step_00000030":
            shutil.copytree(ckpt, folder / "step_00000040")
            shutil.rmtree(ckpt)
        return read(ckpt)

    monkeypatch.setattr(lm_task, "model_weights", saved_and_pruned)
    model, _, ckpt = load_lm(folder)
    assert ckpt == folder / "step_00000040" and isinstance(model, GPT)


def test_load_lm_checks_the_device_first(tmp_path):
    missing = tmp_path / "no checkpoint here"  # so a device checked after the checkpoint would not be reached
    with pytest.raises(UsageError, match="^device: .*"):
        load_lm(missing, device="tpu:x")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device is available: use cpu$"):
            load_lm(missing, device="cuda")


def test_a_fine_tune_on_another_corpus_reads_it_with_the_tokenizer_its_weights_were_trained_with(tmp_path, capsys):
    """A char tokenizer built on the new corpus numbers its characters otherwise: the weights would read other
    tokens. The run is refused, naming the tokenizer to train with, and trains with it."""
    from llm.training import train

    (tmp_path / "a").mkdir()
    source = train_tiny_lm(tmp_path / "a", "the quick brown fox jumps over the lazy dog. " * 200, steps=4)
    (tmp_path / "b.txt").write_text("a lazy dog sleeps. the fox jumps. " * 200)  # fewer characters
    ckpt = source / "checkpoints" / "step_00000004"
    flags = ["--task", "lm", "--training-max-steps", "2", "--training-batch-size", "8", "--model-n-layer", "1",
             "--model-n-embd", "32", "--model-n-head", "2", "--model-block-size", "32", "--data-path",
             str(tmp_path / "b.txt"), "--data-cache-dir", str(tmp_path / "cache"), "--logging-log-dir",
             str(tmp_path / "b"), "--logging-progress-bar", "false", "--checkpoint-init-from", str(source)]
    capsys.readouterr()
    assert train.main(flags) == 2
    assert capsys.readouterr().err == (
        f"error: checkpoint.init_from: this run's tokenizer differs from the one in {ckpt}, whose weights were "
        f"trained with it (they would read other tokens); train with --data-tokenizer {ckpt / 'tokenizer.json'}\n")
    # the same weights with other heads would compute otherwise
    assert train.main([*flags, "--data-tokenizer", str(ckpt / "tokenizer.json"), "--model-n-head", "4"]) == 2
    assert capsys.readouterr().err == (f"error: checkpoint.init_from: this run's model differs from the one in {ckpt} "
                                       f"in n_head (2 -> 4), with which its weights would compute otherwise\n")
    # a model_config.json of an earlier version holds fewer keys: those it lacks are no change; one damaged is a line
    config_file = ckpt / "model_config.json"
    written = config_file.read_text()
    config_file.write_text(json.dumps({k: v for k, v in json.loads(written).items() if k != "tie_embeddings"}))
    reseal(ckpt)
    assert train.main([*flags, "--data-tokenizer", str(ckpt / "tokenizer.json"), "--training-max-steps", "1",
                       "--logging-log-dir", str(tmp_path / "older")]) == 0
    config_file.write_text("[]")
    reseal(ckpt)
    assert train.main([*flags, "--data-tokenizer", str(ckpt / "tokenizer.json")]) == 2
    assert capsys.readouterr().err.endswith(f"error: {config_file} holds a list, not the model's settings\n")
    config_file.write_text(written)
    reseal(ckpt)
    # another dropout, or a longer context with rotary positions, is a model_config.json of its own, not other weights
    assert train.main([*flags, "--data-tokenizer", str(ckpt / "tokenizer.json"), "--model-dropout", "0.1",
                       "--model-block-size", "64"]) == 0
    assert f"started from the weights of {ckpt}" in capsys.readouterr().out
