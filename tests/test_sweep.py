"""`voldit sweep`: Ray Tune over VolDiT sizes, one TorchTrainer per trial, ASHA, a results table."""

import contextlib
import io
import json
import signal

import pandas as pd
import pytest
from omegaconf import OmegaConf

from tests.conftest import CONFIGS
from voldit.checkpoint import load_checkpoint
from voldit.config import ConfigError
from voldit.training.sweeps import concurrent_trials, model_name, parse_grid, summarise, trial_configs


class SweepTimeout(BaseException):
    """Not an Exception, so Tune's loop cannot take it for a trial's error and carry on."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail, rather than hang the suite, when the block runs longer than ``seconds`` (no pytest-timeout)."""

    def expire(signum, frame):
        raise SweepTimeout(f"the sweep ran longer than {seconds} s: a trial waiting for resources?")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


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


def test_the_results_table_counts_each_models_parameters_and_tokens():
    from voldit.builders import describe
    from voldit.config import load_config

    base = OmegaConf.to_container(load_config(CONFIGS / "tiny" / "dit.yaml"), resolve=True)
    xs2, xs4 = (
        describe(load_config(t["config"])) for t in trial_configs(base, ["VolDiT-XS/2", "VolDiT-XS/4"], {})
    )
    # XS/4 has 56 more voxels per patch than XS/2 (64 - 8), in its patch embedding (8 channels x 384 wide)
    # and its output layer (384 + 1 bias, x 8 channels): 56 x (8 x 384 + 385 x 8) = 344,512 more parameters.
    assert xs4["trainable_parameters"] - xs2["trainable_parameters"] == 56 * (8 * 384 + 385 * 8)
    # Tokens: the tiny latents are 8 x 8 x 4; patches of 2 give 4 x 4 x 2, patches of 4 give 2 x 2 x 1.
    assert (xs2["tokens"], xs4["tokens"]) == (4 * 4 * 2, 2 * 2 * 1)


def test_the_results_table_ranks_trials_by_their_best_validation_loss(tmp_path):
    from voldit.config import load_config

    base = OmegaConf.to_container(load_config(CONFIGS / "tiny" / "dit.yaml"), resolve=True)
    trials = trial_configs(base, ["VolDiT-XS/4"], {"optim.lr": [1e-3, 1e-4, 1e-5, 1e-6]})
    names = [t["name"] for t in trials]
    epochs = pd.DataFrame(
        {"epoch": [1, 2, 3], "val_loss": [0.9, 0.4, 0.5], "samples_per_s": [10.0, 30.0, 20.0]}
    )
    frames = {
        names[0]: (epochs.assign(val_loss=[0.9, 0.8, 0.7]), None),  # learns, but less than the second
        names[1]: (epochs, None),  # best at epoch 2
        names[2]: (None, RuntimeError("worker died")),  # failed before reporting
        names[3]: (epochs.assign(val_loss=[0.3, None, None]), RuntimeError("lost")),  # lowest, but failed
    }
    result = summarise(trials, frames, str(tmp_path), str(tmp_path / "trials"))
    table = result.table.fillna({"error": ""})
    assert list(table["trial"]) == [names[3], names[1], names[0], names[2]]
    assert list(table["best_val_loss"][:3]) == [0.3, 0.4, 0.7] and pd.isna(table["best_val_loss"][3])
    assert list(table["epochs"]) == [3, 3, 3, 0]
    assert table["samples_per_s"][1] == 20.0  # the median epoch, not the last or the first
    assert table["tokens_per_s"][1] == 20.0 * 4
    # The best trial is the lowest loss among the trials that finished without an error.
    assert (result.best_trial, result.best_checkpoint) == (
        names[1],
        str(tmp_path / "trials" / names[1] / "checkpoints" / "best"),
    )
    pd.testing.assert_frame_equal(
        pd.read_csv(result.results_file).fillna({"error": ""}), table, check_dtype=False
    )


def test_concurrent_trials_fit_the_free_resources():
    # A trial: 0.5 CPU for its driver, 1 CPU per worker; one CPU stays free for Ray Data.
    assert concurrent_trials({"CPU": 4.0}, workers=1) == 2
    assert concurrent_trials({"CPU": 3.0}, workers=1) == 1  # 4 CPUs, one held by other work
    assert concurrent_trials({"CPU": 16.0}, workers=2) == 6
    assert concurrent_trials({"CPU": 16.0, "GPU": 2.0}, workers=2, gpus_per_worker=0.5) == 2
    assert concurrent_trials({"CPU": 16.0}, workers=1, asked=3) == 3
    assert concurrent_trials({"CPU": 4.0}, workers=1, asked=8) == 2  # never more than fit
    assert concurrent_trials({"CPU": 1.0}, workers=1) == 1  # one at least: it waits, but alone
    assert concurrent_trials({"CPU": 16.0}, workers=1, gpus_per_worker=1.0) == 1


STOPPED_LATEST = "sweep/trials/xs4_depth=1_lr=1e-09/checkpoints/latest/meta.json"


def _sweep_args(crop_latents, storage, lrs="1e-3,1e-9"):
    # Two one-block XS/4 trials, one at a time: the first learns, the second (lr 1e-9) barely moves, so
    # ASHA stops it after its first epoch of three (its loss is above the rung's cutoff).
    config = [str(CONFIGS / "tiny" / "dit.yaml"), "training.n_epochs=3", "training.log_every_n_steps=1000"]
    data = ["--train", str(crop_latents["train"]), "--val", str(crop_latents["val"])]
    grid = ["--models", "XS/4", "--grid", "dit.params.depth=1", f"optim.lr={lrs}"]
    return ["sweep", *config, *data, *grid, "--storage", str(storage), "--max-concurrent", "1"]


@pytest.fixture(scope="module")
def small_sweep(crop_latents, ray_session, tmp_path_factory):
    """A finished two-trial sweep, run while other Ray work holds one of the session's 4 CPUs; with the
    placement groups as they were the moment it returned."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from voldit.cli import main

    storage = tmp_path_factory.mktemp("sweep")
    other = placement_group([{"CPU": 1}])
    ray_session.get(other.ready(), timeout=60)
    before = set(ray_session.util.placement_group_table())
    printed = io.StringIO()
    try:
        with deadline(420), contextlib.redirect_stdout(printed):
            assert main(_sweep_args(crop_latents, storage)) == 0
        groups = ray_session.util.placement_group_table()
    finally:
        remove_placement_group(other)
    return {
        "storage": storage,
        "printed": printed.getvalue(),
        "table": pd.read_csv(storage / "sweep" / "results.csv"),
        "other_work": groups[other.id.hex()]["state"],
        "new_groups": {k: v["state"] for k, v in groups.items() if k not in before},
        "stopped_latest": json.loads((storage / STOPPED_LATEST).read_text()),
    }


@pytest.mark.slow
def test_a_sweep_writes_a_results_table_best_first_and_its_best_checkpoint(small_sweep):
    from voldit.builders import count_parameters, model_from_checkpoint

    table = small_sweep["table"].fillna({"error": ""})
    # The trial that learned comes first.
    assert list(table["trial"]) == ["xs4_depth=1_lr=0.001", "xs4_depth=1_lr=1e-09"]
    assert (table["error"] == "").all()  # both trials finished (ASHA stopping one is not an error)
    assert (table["tokens"] == 4).all() and (pd.to_numeric(table["samples_per_s"]) > 0).all()
    best = table["checkpoint"][0]
    assert f"best trial: {table['trial'][0]}; checkpoint: {best}" in small_sweep["printed"]
    model = model_from_checkpoint(load_checkpoint(best, stage="dit"), eval_mode=False)
    assert len(model.blocks) == 1 and count_parameters(model)[0] == table["parameters"][0]


@pytest.mark.slow
def test_a_sweep_leaves_no_placement_group_of_its_trials(small_sweep):
    groups = small_sweep["new_groups"]
    # Tune's own group and the TorchTrainer's workers' group, per trial.
    assert len(groups) >= 4
    assert groups == dict.fromkeys(groups, "REMOVED")
    assert small_sweep["other_work"] == "CREATED"  # the sweep freed its own reservations only


@pytest.mark.slow
def test_a_rerun_restores_the_sweep(small_sweep, crop_latents, monkeypatch):
    from ray import tune

    from voldit.cli import main

    first = small_sweep["table"].set_index("trial")
    assert dict(first["epochs"]) == {"xs4_depth=1_lr=0.001": 3, "xs4_depth=1_lr=1e-09": 1}  # ASHA stopped one
    restored = []
    original = tune.Tuner.restore

    def restore(cls, path, *args, **kwargs):
        restored.append(path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(tune.Tuner, "restore", classmethod(restore))
    storage = small_sweep["storage"]
    with deadline(180):
        assert main(_sweep_args(crop_latents, storage)) == 0
    assert restored == [str(storage / "sweep")]
    again = pd.read_csv(storage / "sweep" / "results.csv").set_index("trial")
    assert not again[["epochs", "best_val_loss", "samples_per_s"]].isna().any().any()
    pd.testing.assert_frame_equal(again, first, check_exact=True)  # the same numbers, to the bit
    # The stopped trial's run is where the stop left it (its workers may have finished the epoch they were
    # in, a fresh sweep would have trained it on to epoch 3).
    assert json.loads((storage / STOPPED_LATEST).read_text()) == small_sweep["stopped_latest"]
    assert main(_sweep_args(crop_latents, storage, lrs="1e-3,1e-2")) == 2  # other trials: refused
