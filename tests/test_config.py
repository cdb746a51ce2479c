"""Config: YAML recipes, dotted overrides, family defaults, the depth dial and every impossible setting."""

from pathlib import Path

import pytest

from llmmo.config import Config, load_config, resolve_config
from llmmo.errors import ConfigError

CONFIGS = Path(__file__).parent.parent / "configs"


def test_layers_of_precedence(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {n_layer: 6, family: llama}\ntrain: {lr: 3.0e-4}\n")
    cfg = load_config(recipe, {"model.n_layer": "2", "train.resume": "true", "train.max_tokens": "1e6"})
    assert (cfg.model.n_layer, cfg.model.family, cfg.train.lr) == (2, "llama", 3e-4)
    assert cfg.train.resume is True and cfg.train.max_tokens == 1_000_000
    assert cfg.model.n_embd == Config().model.n_embd


@pytest.mark.parametrize("recipe", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_resolves(recipe: Path) -> None:
    cfg = resolve_config(load_config(recipe))
    assert cfg.model.block_size == cfg.data.block_size


def test_shakespeare_recipe_is_nanogpts_baby_gpt() -> None:
    cfg = resolve_config(load_config(CONFIGS / "shakespeare-char.yaml"))
    m, t = cfg.model, cfg.train
    assert (m.n_layer, m.n_head, m.n_embd, cfg.data.block_size, m.dropout) == (6, 6, 384, 256, 0.2)
    assert (t.lr, t.max_steps, t.batch_size) == (1e-3, 5000, 64)


def test_cpu_recipe_is_the_readme_overrides_of_the_gpu_recipe() -> None:
    readme = {
        "model.n_layer": 4,
        "model.n_head": 4,
        "model.n_embd": 128,
        "model.dropout": 0.0,
        "data.block_size": 64,
        "train.batch_size": 12,
        "train.max_steps": 2000,
    }
    from_overrides = load_config(CONFIGS / "shakespeare-char.yaml", readme)
    cpu = load_config(CONFIGS / "shakespeare-char-cpu.yaml")
    assert cpu.model == from_overrides.model and cpu.data == from_overrides.data
    assert cpu.train.out_dir != from_overrides.train.out_dir  # its own run folder, the rest equal
    cpu.train.out_dir = from_overrides.train.out_dir
    assert cpu.train == from_overrides.train


def test_depth_dial_sets_the_shape() -> None:
    m = resolve_config(load_config(overrides={"model.depth": 4})).model
    assert (m.n_layer, m.n_embd, m.n_head, m.n_kv_head) == (4, 256, 4, 4)
    gqa = resolve_config(load_config(overrides={"model.depth": 4, "model.family": "llama", "model.n_kv_head": 2}))
    assert (gqa.model.n_head, gqa.model.n_kv_head) == (4, 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.n_layr": 4}, "unknown config key 'model.n_layr'; did you mean 'model.n_layer'"),
        ({"train.lrr": 1}, "did you mean 'train.lr'"),
        ({"model.n_layer": "four"}, "'model.n_layer' expects int, got 'four'"),
        ({"train.resume": "maybe"}, "'train.resume' expects bool"),
        ({"model.n_layer": 2.5}, "expects int"),
    ],
)
def test_bad_keys_and_values_are_named(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"model.n_embd": 100, "model.n_head": 3},
            r"n_embd \(100\) must be divisible by model.n_head \(3\); try n_head 2",
        ),
        ({"model.n_head": 4, "model.n_kv_head": 3}, r"must be a multiple of model.n_kv_head \(3\)"),
        ({"model.family": "gpt5"}, "model.family 'gpt5' is not one of"),
        ({"model.family": "llama", "model.n_embd": 12, "model.n_head": 4}, "even head size"),
        ({"data.tokenizer": "sentencepiece"}, "data.tokenizer 'sentencepiece' is not one of"),
        ({"data.block_size": 0}, "data.block_size must be positive"),
        ({"data.tokenizer": "bpe", "data.vocab_size": 100}, "vocab_size >= 257"),
        ({"train.min_lr": 1.0, "train.lr": 0.1}, "min_lr <= train.lr"),
        ({"train.epochs": 2}, "train.epochs needs train.sampler=epoch"),
        ({"train.max_steps": 0}, "set a budget"),
        ({"model.dropout": 1.0}, r"model.dropout must be in \[0, 1\)"),
        ({"model.block_size": 32, "data.block_size": 64}, "exceeds model.block_size"),
        ({"train.beta2": 1.0}, r"train.beta2 must be in \[0, 1\)"),
        ({"train.beta1": -0.1}, r"train.beta1 must be in \[0, 1\)"),
        ({"train.muon_lr": 0.0}, "train.muon_lr must be positive"),
        ({"train.seed": -1}, "train.seed must be 0 or more and finite"),
        ({"train.warmup_steps": -5}, "train.warmup_steps must be 0 or more and finite"),
        ({"train.weight_decay": -0.1}, "train.weight_decay must be 0 or more and finite"),
        ({"train.eval_batches": -1}, "train.eval_batches must be 0 or more and finite"),
        ({"train.grad_clip": float("nan")}, "train.grad_clip is NaN"),
        ({"train.lr": float("nan")}, "lr > 0 and finite"),
        ({"train.min_lr": float("nan")}, "lr > 0 and finite"),
        ({"train.lr": float("inf")}, "lr > 0 and finite"),
        ({"model.norm_eps": 0.0}, "model.norm_eps must be positive"),
        ({"model.rope_theta": -1.0}, "model.rope_theta must be positive"),
    ],
)
def test_impossible_configs_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_config(load_config(overrides=overrides))


def test_bad_recipe_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "sect.yaml").write_text("modle: {n_layer: 2}\n")
    with pytest.raises(ConfigError, match="did you mean 'model"):
        load_config(tmp_path / "sect.yaml")


def test_data_path_is_stored_absolute_and_still_names_the_same_files(tmp_path: Path, monkeypatch) -> None:
    """A checkpoint's data.path must find the text from any working folder: it is made absolute, `~` expanded,
    and a relative glob keeps the working folder's own glob characters literal."""
    from llmmo.data.corpus import list_text_files

    folder = tmp_path / "runs[1]"
    folder.mkdir()
    (folder / "a.txt").write_text("some text\n")
    monkeypatch.chdir(folder)
    monkeypatch.setenv("HOME", str(folder))
    for given in ("a.txt", "*.txt", "~/a.txt"):
        path = resolve_config(load_config(overrides={"data.path": given})).data.path
        assert Path(path).is_absolute() and list_text_files(path)[0] == [folder / "a.txt"], given
