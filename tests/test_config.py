import pytest
import yaml

from tests.conftest import CONFIGS
from voldit.config import ConfigError, dit_kwargs, load_config, stage_of

SEED_DIT = {
    "dit": {
        "params": {
            "input_size": [64, 64, 32],
            "patch_size": 4,
            "in_channels": 8,
            "hidden_size": 1152,
            "depth": 24,
            "num_heads": 16,
            "mlp_ratio": 4.0,
            "class_dropout_prob": 0.0,
            "num_classes": 0,
            "learn_sigma": False,
            "flash_attention": True,
        },
        "scheduler": {"schedule": "cosine", "num_train_timesteps": 300, "prediction_type": "v_prediction"},
    }
}
SEED_TGCA = {
    "tgca": {
        "condition_keys": ["mask"],
        "params": {
            "condition_channels": 1,
            "inject_layers": None,
            "finetune_last_n_blocks": 0,
            "condition_dropout_prob": 0.1,
        },
    },
    "training": {
        "n_epochs": 500,
        "eval_freq": 25,
        "batch_size": 2,
        "num_workers": 4,
        "roi_size": [512, 512, 256],
        "use_precomputed_latents": True,
        "scale_factor": 1.0,
        "use_ema": True,
        "ema_decay": 0.9999,
        "condition_dropout": 0.1,
        "spatial_dropout_prob": 0.0,
        "spatial_dropout_patch_size": 16,
        "cache": False,
        "persistent": False,
    },
    "optim": {"lr": 5.0e-5, "lr_gamma": 0.999},
}


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_seed_format_files_load(tmp_path):
    cfg = load_config(_write(tmp_path, "dit.yaml", SEED_DIT), _write(tmp_path, "tgca.yaml", SEED_TGCA))
    assert stage_of(cfg) == "tgca"
    assert cfg.dit.params.hidden_size == 1152 and cfg.optim.lr == 5e-5
    assert "flash_attention" not in dit_kwargs(cfg)
    # The authors' files name no dropout: the schema gives their trained recipe (none on attention weights).
    assert dit_kwargs(cfg)["dropout"] == 0.1 and dit_kwargs(cfg)["attention_dropout"] == 0.0


def test_stage_defaults_come_from_the_seed():
    assert load_config(CONFIGS / "stage1" / "vqgan_ds8.yaml").training.batch_size == 4
    assert load_config(CONFIGS / "transformer" / "dit_ds8_b4.yaml").optim.lr == 1e-4
    tgca = load_config(CONFIGS / "transformer" / "dit_ds8_b4.yaml", CONFIGS / "tgca" / "tgca_ds8.yaml")
    assert tgca.optim.lr == 5e-5 and tgca.training.n_epochs == 500


def test_overrides_apply_and_are_validated():
    cfg = load_config(CONFIGS / "tiny" / "dit.yaml", overrides=["optim.lr=0.5", "dit.params.depth=3"])
    assert cfg.optim.lr == 0.5 and cfg.dit.params.depth == 3
    with pytest.raises(ConfigError, match="must look like"):
        load_config(CONFIGS / "tiny" / "dit.yaml", overrides=["optim.lr"])


BAD = [
    ({"dit": {"params": {"hidden_sise": 64}}}, r"unknown key 'dit\.params\.hidden_sise'"),
    ({"dit": {"params": {"depth": "deep"}}}, r"'dit\.params\.depth' has a value of the wrong type"),
    (
        {"dit": {"params": {"hidden_size": 100, "num_heads": 16}}},
        r"dit\.params\.hidden_size 100 is not divisible by dit\.params\.num_heads 16; choose num_heads",
    ),
    (
        {"dit": {"params": {"input_size": [64, 64, 30], "patch_size": 4}}},
        r"dit\.params\.input_size \[64, 64, 30\] is not divisible by dit\.params\.patch_size 4",
    ),
    (
        {"stage1": {}, "training": {"roi_size": [512, 512, 100]}},
        r"training\.roi_size \[512, 512, 100\] is not divisible by the VQ-GAN downsampling factor 8; use sizes",
    ),
    ({"dit": {"params": {"num_classes": 10}}}, r"dit\.params\.num_classes asks for class labels"),
    ({"dit": {"scheduler": {"schedule": "quadratic"}}}, r"dit\.scheduler\.schedule is 'quadratic'"),
    ({"dit": {"params": {"attention": "flash3"}}}, r"dit\.params\.attention is 'flash3'"),
    (
        {"dit": {"params": {"attention_dropout": 1.0}}},
        r"dit\.params\.attention_dropout is 1\.0; use a probability in \[0, 1\)",
    ),
    ({"dit": {"params": {"dropout": -0.1}}}, r"dit\.params\.dropout is -0\.1; use a probability"),
    (
        {"dit": {}, "tgca": {"params": {"inject_layers": 30}}},
        r"tgca\.params\.inject_layers is 30 for a DiT of depth 24",
    ),
    (
        {"tgca": {"params": {"condition_dropout_prob": 0.2}}, "training": {"condition_dropout": 0.1}},
        r"training\.condition_dropout \(0\.1\) contradicts tgca\.params\.condition_dropout_prob",
    ),
    (
        {"tgca": {"condition_keys": ["a", "b"], "params": {"condition_channels": 1}}},
        r"tgca\.params\.condition_channels 1 is fewer than the 2 condition keys",
    ),
    (
        {"stage1": {}, "dit": {"params": {"input_size": [32, 32, 32]}}},
        r"dit\.params\.input_size \[32, 32, 32\] differs from the latent",
    ),
    ({"training": {"batch_size": 4}}, r"none of the sections stage1, dit or tgca"),
    ({"dit": {}, "training": {"mixed_precision": "fp8"}}, r"training\.mixed_precision is 'fp8'"),
]


@pytest.mark.parametrize(("data", "message"), BAD, ids=[m.split("\\")[0][:30] for _, m in BAD])
def test_bad_configs_are_rejected_with_their_own_message(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, "bad.yaml", data))


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


@pytest.mark.deadline(60)
def test_seed_keys_voldit_does_not_read_are_refused_or_checked(tmp_path):
    seed = load_config(
        CONFIGS / "tiny" / "dit.yaml", _write(tmp_path, "seed.yaml", {"training": SEED_TGCA["training"]})
    )
    assert seed.training.num_workers == 4 and seed.training.use_precomputed_latents is True
    with pytest.raises(
        ConfigError, match=r"training\.num_workers is 8, but voldit does not read it.*--workers"
    ):
        load_config(CONFIGS / "tiny" / "dit.yaml", overrides=["training.num_workers=8"])

    from voldit.distributed.train import train

    def run(value, data, vqgan=None):
        cfg = load_config(
            CONFIGS / "tiny" / "dit.yaml", overrides=[f"training.use_precomputed_latents={value}"]
        )
        train(cfg, "dit", str(data), vqgan=vqgan, storage=str(tmp_path / "runs"), workers=0)

    # Checked before any work: no Ray, no data read.
    with pytest.raises(
        ConfigError, match=r"use_precomputed_latents is true, but --train .*encodes images online"
    ):
        run("true", tmp_path / "images.csv", vqgan=str(tmp_path / "vqgan"))
    with pytest.raises(ConfigError, match=r"use_precomputed_latents is false .*--vqgan <VQ-GAN checkpoint>"):
        run("false", tmp_path / "latents")
