"""The family and task registries: a new model family, and a new task, each added
by one registry entry, work through `build`, the train step, FLOPs, checkpoints'
config records, the run config and the CLI (`info`, `train`)."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from transformer_jax import cross_entropy, models
from transformer_jax.config import TransformerConfig
from transformer_jax.models import registry
from transformer_jax.run.config import RunConfig
from transformer_jax.training import config_io, metrics, tasks
from transformer_jax.training.state import create_train_state
from transformer_jax.training.step import make_train_step


@dataclasses.dataclass(frozen=True)
class BigramConfig(TransformerConfig):
    """A bigram language model: no attention at all, so its FLOPs are 6 N exactly."""
    vocab_size: int = 50
    max_len: int = 64
    causal = True


class BigramLM(nn.Module):
    """ids -> logits of the next token from the current one alone."""
    config: BigramConfig

    def setup(self):
        self.embed = nn.Embed(self.config.vocab_size, self.config.d_model)
        self.out = nn.Dense(self.config.vocab_size)

    def __call__(self, input_ids, *, attention_mask=None, deterministic=True):
        return self.out(self.embed(input_ids))

    def token_stats(self, input_ids, targets, *, attention_mask=None, deterministic=True):
        # The method the "lm" task calls: it reuses that task without a new entry.
        return cross_entropy.token_stats(self(input_ids), targets, self.config.vocab_size)


BIGRAM = registry.ModelFamily(
    "bigram", BigramConfig, BigramLM, default_task="lm", commands=("generate",),
    attention_layers=lambda config: 0,
    presets={"bigram-tiny": dict(num_layers=1, d_model=16, num_heads=2, d_ff=32)})


@pytest.fixture
def bigram():
    registry.register_family(BIGRAM)      # the one entry
    yield BIGRAM
    registry.unregister_family("bigram")


def _batch(vocab, rows=3, cols=9, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (rows, cols + 1)).astype(np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
            "loss_mask": (rng.random((rows, cols)) < 0.8).astype(np.float32)}


def _numpy_loss(params, batch):
    """Masked mean next-token cross-entropy in float64, from the parameters alone."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    logits = p["embed"]["embedding"][batch["input_ids"]] @ p["out"]["kernel"] + p["out"]["bias"]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    w = batch["loss_mask"]
    return float((nll * w).sum() / w.sum())


def test_a_new_family_trains_counts_flops_and_is_stored(bigram):
    config = models.get_config("bigram-tiny")
    assert isinstance(config, BigramConfig) and models.family_of(config) is bigram
    assert isinstance(models.build(config), BigramLM)
    assert tasks.task_for_config(config) == "lm" and "lm" in tasks.tasks_of("bigram")
    state = create_train_state(config, optax.sgd(0.1), jax.random.PRNGKey(0))
    batch = _batch(config.vocab_size)
    expected = _numpy_loss(state.params, batch)   # before the step donates the state
    new, out = make_train_step("lm")(state, batch)
    np.testing.assert_allclose(float(out["loss"]), expected, rtol=1e-5)
    assert int(new.step) == 1 and _numpy_loss(new.params, batch) < float(out["loss"])
    # FLOPs: 6 N with N counted by hand (embedding, kernel, bias), no attention term.
    v, d = config.vocab_size, config.d_model
    assert metrics.model_flops_per_token(config, 32) == 6 * (v * d + d * v + v)
    # Checkpoints record the config by class name and rebuild it.
    assert config_io.config_from_dict(config_io.config_to_dict(config)) == config
    # The run config accepts the preset for its default task, and refuses others.
    RunConfig(model="bigram-tiny", task="lm", seq_len=32)
    with pytest.raises(ValueError, match="task 'mlm' needs a BertConfig preset"):
        RunConfig(model="bigram-tiny", task="mlm")


def test_unregistered_family_is_gone(bigram):
    registry.unregister_family("bigram")
    try:
        assert "bigram-tiny" not in models.PRESETS
        with pytest.raises(ValueError, match="belongs to no registered model family"):
            models.build(BigramConfig(num_layers=1, d_model=16, num_heads=2, d_ff=32))
    finally:
        registry.register_family(BIGRAM)


def test_a_family_name_or_preset_cannot_be_taken_twice(bigram):
    with pytest.raises(ValueError, match="already registered"):
        registry.register_family(BIGRAM)
    with pytest.raises(ValueError, match=r"presets \['gpt-tiny'\] already exist"):
        registry.register_family(dataclasses.replace(BIGRAM, name="other",
                                                     presets={"gpt-tiny": {}}))


def test_the_cli_lists_and_trains_a_new_family(bigram, tmp_path, capsys):
    from transformer_jax.run.cli import main
    assert main(["info"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("bigram-tiny"))
    assert row.split()[1:3] == ["bigram", "BigramConfig"] and row.endswith("lm")
    out = tmp_path / "run"
    assert main(["train", "--model", "bigram-tiny", "--task", "lm", "--max-documents", "20",
                 "--vocab-size", "300", "--seq-len", "16", "--batch-size", "4", "--steps", "3",
                 "--warmup", "1", "--eval-every", "3", "--peak-tflops", "1", "--out", str(out),
                 "--no-progress"]) == 0
    from transformer_jax.run.loading import load_run
    config, params, _, run = load_run(out)
    assert isinstance(config, BigramConfig) and config.vocab_size == 300 and run.model == "bigram-tiny"
    assert set(params) == {"embed", "out"}


def test_a_new_task_is_one_entry():
    # Teacher-forced LM scored on every position, from GPT's logits method.
    def loss(logits, batch, task):
        stats = cross_entropy.token_stats(logits, batch["targets"], logits.shape[-1])
        return {"loss": jnp.mean(stats["loss"])}
    example = tasks.TASKS["lm"].example_batch
    task = tasks.register_task(tasks.Task(
        name="lm-all", family="gpt", dataset="lm", fields=("input_ids", "targets"),
        method="logits", inputs=lambda b: ((b["input_ids"],), {}), loss=loss,
        example_batch=lambda c, b, s: {k: v for k, v in example(c, b, s).items() if k != "loss_mask"},
        num_tokens=lambda b: int(np.size(b["input_ids"]))))
    try:
        config = models.get_config("gpt-tiny", num_layers=1, d_model=32, num_heads=2, d_ff=64,
                                   vocab_size=40, max_len=16)
        state = create_train_state(config, optax.sgd(0.0), jax.random.PRNGKey(1), task="lm-all")
        batch = _batch(40, cols=16, seed=1)
        logits = np.asarray(models.GPT(config).apply({"params": state.params}, batch["input_ids"]),
                            np.float64)
        _, out = make_train_step(task)(state, {k: batch[k] for k in ("input_ids", "targets")})
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll = logz - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        np.testing.assert_allclose(float(out["loss"]), nll.mean(), rtol=1e-5)
        assert "lm-all" in tasks.tasks_of("gpt")
        RunConfig(model="gpt-tiny", task="lm-all")   # the CLI's --task accepts it
    finally:
        tasks.unregister_task("lm-all")
    with pytest.raises(ValueError, match="task='lm-all' is not valid"):
        RunConfig(model="gpt-tiny", task="lm-all")


@pytest.mark.parametrize("name", registry.names())
def test_every_builtin_family_builds_its_default_and_its_tasks_exist(name):
    family = registry.get_family(name)
    assert family.default_task in tasks.TASKS and family.presets
    for preset in family.presets:
        config = models.get_config(preset)
        assert models.family_of(config) is family
        assert type(models.build(config)) is type(family.build(config))


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_every_task_scores_its_example_batch_on_its_family(name):
    # Each registered task: its smallest preset's model, its example batch, a finite loss.
    task = tasks.get_task(name)
    family = registry.get_family(task.family)
    preset = min(family.presets, key=lambda p: models.get_config(p).num_layers * models.get_config(p).d_model)
    config = models.get_config(preset, num_layers=1, d_model=32, num_heads=2, d_ff=64,
                               vocab_size=64, max_len=16)
    state = create_train_state(config, optax.sgd(0.0), jax.random.PRNGKey(0), task=name)
    batch = task.example_batch(config, 2, 16)
    assert set(task.fields) <= set(batch)
    from transformer_jax.training.step import eval_step
    out = eval_step(state, batch, task)
    assert np.isfinite(float(out["loss"])) and float(out["loss"]) > 0
