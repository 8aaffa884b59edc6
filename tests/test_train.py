"""Training: the shared loop through Ray Train, in-process (num_workers=0) and with real workers."""

import math

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import CONFIGS
from voldit.builders import model_from_checkpoint
from voldit.checkpoint import load_checkpoint
from voldit.config import ConfigError, load_config
from voldit.data.latents import load_info
from voldit.training.context import TrainingError

TINY_DIT = CONFIGS / "tiny" / "dit.yaml"
TINY_TGCA = CONFIGS / "tiny" / "tgca.yaml"
QUIET = ["training.log_every_n_steps=1000"]


def _train(cfg, stage, data, storage, name, workers=0, **kwargs):
    from voldit.distributed.train import train

    return train(
        cfg,
        stage,
        str(data["train"]),
        str(data["val"]) if "val" in data else None,
        name=name,
        storage=str(storage),
        workers=workers,
        **kwargs,
    )


def _same(a, b, name="model"):
    wa, wb = (load_file(p / f"{name}.safetensors") for p in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def dit_run(crop_latents, tmp_path_factory, ray_session):
    storage = tmp_path_factory.mktemp("runs")
    cfg = load_config(TINY_DIT, overrides=["training.n_epochs=2", "training.eval_freq=1", *QUIET])
    return _train(cfg, "dit", crop_latents, storage, "dit")


def test_in_process_dit_run_leaves_self_describing_checkpoints(dit_run, crop_latents):
    names = sorted(p.name for p in (dit_run.run_dir / "checkpoints").iterdir())
    assert names == ["best", "epoch_0001", "epoch_0002", "latest"]
    ckpt = load_checkpoint(dit_run.latest, stage="dit")
    assert ckpt.meta["epoch"] == 2 and ckpt.meta["step"] == 10  # 10 crops, batch 2, drop_last
    assert ckpt.meta["scale_factor"] == load_info(crop_latents["train"]).scale_factor  # nobody typed it
    assert ckpt.meta["latent_shape"] == [8, 8, 8, 4]
    assert math.isfinite(dit_run.metrics["val_loss"])
    model_from_checkpoint(ckpt)  # rebuilds from the directory alone
    assert list((dit_run.run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_compiled_training_matches_eager_and_saves_plain_names(dit_run, crop_latents, tmp_path, ray_session):
    """`training.compile` (per-block torch.compile) trains the same model as eager mode."""
    cfg = load_config(
        TINY_DIT, overrides=["training.n_epochs=2", "training.eval_freq=1", "training.compile=true", *QUIET]
    )
    compiled = _train(cfg, "dit", crop_latents, tmp_path, "compiled")
    a, b = (load_file(run.latest / "model.safetensors") for run in (compiled, dit_run))
    assert a.keys() == b.keys()  # no "_orig_mod." prefixes: the checkpoint loads anywhere
    # Compiled kernels sum in another order, and AdamW (which normalises by the gradient size) amplifies
    # that on near-zero gradients: about 4e-5 of the weights after 10 steps. A wrong graph moves far more.
    change = sum(float((a[k] - b[k]).square().sum()) for k in a) ** 0.5
    size = sum(float(b[k].square().sum()) for k in a) ** 0.5
    assert change / size < 1e-3, change / size
    assert compiled.metrics["val_loss"] == pytest.approx(dit_run.metrics["val_loss"], rel=1e-3)


def test_resume_is_bit_identical_to_an_uninterrupted_run(crop_latents, tmp_path, ray_session):
    def cfg(epochs):
        return load_config(
            TINY_DIT,
            overrides=[
                f"training.n_epochs={epochs}",
                "training.eval_freq=2",
                "dit.params.dropout=0.1",
                *QUIET,
            ],
        )

    _train(cfg(2), "dit", crop_latents, tmp_path, "stopped")
    resumed = _train(cfg(4), "dit", crop_latents, tmp_path, "stopped")  # same name: resumes at epoch 2
    straight = _train(cfg(4), "dit", crop_latents, tmp_path, "straight")
    assert resumed.metrics["step"] == straight.metrics["step"] == 20
    for name in ("model", "ema"):
        assert _same(resumed.latest, straight.latest, name), name
    assert resumed.metrics["val_loss"] == straight.metrics["val_loss"]


def test_resume_from_a_mid_epoch_checkpoint_is_bit_identical(crop_latents, tmp_path, ray_session):
    """A run stopped in the middle of an epoch (max_steps, as a lost node with checkpoint_every_steps
    would be) resumes there: it skips the batches it trained on and ends where an uninterrupted run does."""

    def cfg(*extra):
        keys = ["training.n_epochs=2", "training.eval_freq=2", "dit.params.dropout=0.1", *QUIET]
        return load_config(TINY_DIT, overrides=[*keys, *extra])

    stopped = _train(cfg("training.max_steps=7", "training.checkpoint_every_steps=3"), "dit", crop_latents,
                     tmp_path, "mid")  # fmt: skip
    meta = load_checkpoint(stopped.latest).meta
    assert (meta["epoch"], meta["step"], meta["epoch_step"]) == (1, 7, 2)  # 5 steps per epoch
    resumed = _train(cfg(), "dit", crop_latents, tmp_path, "mid")
    straight = _train(cfg(), "dit", crop_latents, tmp_path, "straight")
    assert resumed.metrics["step"] == straight.metrics["step"] == 10
    for name in ("model", "ema"):
        assert _same(resumed.latest, straight.latest, name), name


def test_mid_epoch_checkpoints_are_saved_every_n_steps(crop_latents, tmp_path, ray_session, monkeypatch):
    from voldit.training.store import CheckpointStore

    saved = []
    original = CheckpointStore.save
    monkeypatch.setattr(
        CheckpointStore,
        "save",
        lambda self, aliases, **c: saved.append(c["meta"]["step"]) or original(self, aliases, **c),
    )
    _train(load_config(TINY_DIT, overrides=["training.n_epochs=2", "training.eval_freq=2",
                                            "training.checkpoint_every_steps=4", *QUIET]),
           "dit", crop_latents, tmp_path, "every")  # fmt: skip
    assert saved == [4, 8, 10]  # steps 4 and 8 mid-epoch, then the final checkpoint after epoch 2
    with pytest.raises(ConfigError, match="checkpoint_every_steps"):
        load_config(TINY_DIT, overrides=["training.checkpoint_every_steps=0"])


def test_tgca_trains_only_the_adapter_of_the_frozen_checkpoint(dit_run, crop_latents, tmp_path, ray_session):
    cfg = load_config(TINY_TGCA, overrides=["training.n_epochs=1", *QUIET])
    result = _train(cfg, "tgca", crop_latents, tmp_path, "tgca", dit=str(dit_run.best))
    ckpt = load_checkpoint(result.latest, stage="tgca")
    assert ckpt.config.dit.params.hidden_size == 64  # architecture taken from the VolDiT checkpoint
    assert ckpt.meta["scale_factor"] == load_checkpoint(dit_run.best).meta["scale_factor"]
    base = load_checkpoint(dit_run.best).model_state(use_ema=True)
    weights = ckpt.weights("model")
    assert all(torch.equal(weights[f"base_model.{k}"], v) for k, v in base.items())  # frozen
    assert set(ckpt.weights("ema")) == {
        n
        for n, p in model_from_checkpoint(ckpt, eval_mode=False).named_parameters()
        if not n.startswith("base_model.")
    }


def test_tgca_against_another_architecture_is_rejected(dit_run, crop_latents, tmp_path, ray_session):
    cfg = load_config(TINY_DIT, TINY_TGCA, overrides=["dit.params.depth=3"])
    with pytest.raises(TrainingError, match="another architecture.*depth: config 3 vs checkpoint 2"):
        _train(cfg, "tgca", crop_latents, tmp_path, "bad", dit=str(dit_run.best))
    with pytest.raises(ConfigError, match="needs --dit"):
        _train(load_config(TINY_TGCA), "tgca", crop_latents, tmp_path, "bad")


def test_latents_of_another_size_are_rejected_before_training(crop_latents, tmp_path, ray_session):
    cfg = load_config(TINY_DIT, overrides=["dit.params.input_size=[16,16,8]"])
    with pytest.raises(
        TrainingError, match=r"have shape \[8, 8, 8, 4\], the config expects \[8, 16, 16, 8\]"
    ):
        _train(cfg, "dit", crop_latents, tmp_path, "bad")


def test_empty_and_too_small_datasets(crop_latents, tmp_path, ray_session):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "dataset.json").write_text((crop_latents["train"] / "dataset.json").read_text())
    with pytest.raises(TrainingError, match="holds no latent parts"):
        _train(load_config(TINY_DIT), "dit", {"train": empty}, tmp_path, "empty")
    big_batch = load_config(TINY_DIT, overrides=["training.batch_size=64", *QUIET])
    with pytest.raises(TrainingError, match="got no training batch"):
        _train(big_batch, "dit", {"train": crop_latents["train"]}, tmp_path, "small")


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(crop_latents, tmp_path, ray_session):
    good = load_config(TINY_DIT, overrides=["training.n_epochs=1", *QUIET])
    _train(good, "dit", crop_latents, tmp_path, "nan")
    # Latents scaled past float32's range: the first step after resuming overflows.
    wild = load_config(TINY_DIT, overrides=["training.n_epochs=3", "training.scale_factor=1e38", *QUIET])
    with pytest.raises(
        TrainingError, match=r"the loss became (nan|inf) at step 6 \(epoch 2\).*nan/checkpoints/latest"
    ):
        _train(wild, "dit", crop_latents, tmp_path, "nan")
    latest = load_checkpoint(tmp_path / "nan" / "checkpoints" / "latest")
    assert latest.meta["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in latest.weights("model").values())


def test_in_process_vqgan_run_with_adversarial_warm_up(crops, tmp_path, ray_session):
    cfg = load_config(
        CONFIGS / "tiny" / "vqgan.yaml",
        overrides=[
            "training.n_epochs=2",
            "stage1.adv_warmup_epochs=1",
            "training.eval_freq=2",
            "training.max_steps=6",
            *QUIET,
        ],
    )
    result = _train(cfg, "vqgan", crops, tmp_path, "vq")
    ckpt = load_checkpoint(result.latest, stage="vqgan")
    assert ckpt.has("discriminator") and ckpt.meta["latent_shape"] == [8, 8, 8, 4]
    assert result.metrics["step"] == 6 and math.isfinite(result.metrics["val_loss"])
    model_from_checkpoint(ckpt)


def test_unaugmented_vqgan_runs_repeat_exactly(crops, tmp_path, ray_session):
    def run(name, augment):
        overrides = ["training.n_epochs=2", "training.eval_freq=2", f"training.augment={augment}", *QUIET]
        cfg = load_config(CONFIGS / "tiny" / "vqgan.yaml", overrides=overrides)
        return _train(cfg, "vqgan", crops, tmp_path, name).latest

    plain = run("plain", "false")
    assert _same(plain, run("again", "false"))
    # Augmented, 20 samples each rotated (p 0.2) or flipped (p 0.5): the same weights only by a 1e-8 chance.
    assert not _same(plain, run("augmented", "true"))


@pytest.mark.slow
def test_two_workers_recover_from_a_killed_worker(crop_latents, tmp_path, ray_session, monkeypatch):
    from voldit.distributed.train import FAILURE_ENV

    marker = tmp_path / "fail-once"
    marker.touch()
    monkeypatch.setenv(FAILURE_ENV, f"4:{marker}")  # rank 0 dies at its 4th step (epoch 2 of 3)
    cfg = load_config(TINY_DIT, overrides=["training.n_epochs=3", "training.eval_freq=1", *QUIET])
    result = _train(cfg, "dit", crop_latents, tmp_path, "ddp", workers=2, max_failures=1)
    assert not marker.exists()  # the failure did happen
    assert result.metrics["epoch"] == 3 and result.metrics["step"] == 6  # 10 rows / 2 workers / batch 2
    for name in ("latest", "best", "epoch_0001", "epoch_0002", "epoch_0003"):
        model_from_checkpoint(load_checkpoint(tmp_path / "ddp" / "checkpoints" / name))


def _first_rows(folder, dest, n):
    """A latent folder holding the first ``n`` rows of another."""
    from voldit.data.latents import read_latents, summarise, write_part

    columns = ["id", "image", "latent", "affine", "mask", "mask_path"]
    data = read_latents(folder, columns, limit=n)
    write_part(dest, [{c: data[c][i] for c in columns} for i in range(n)], ["mask"])
    info = load_info(folder)
    summarise(dest, info.roi_size, ["mask"], info.vqgan_checkpoint)
    return dest


@pytest.mark.deadline(30)
def test_validation_shares_give_every_row_to_exactly_one_worker():
    import numpy as np

    from voldit.training.context import validation_share

    for rows in range(8):
        for world_size in range(1, 5):
            seen = []
            for rank in range(world_size):
                data = [{"latent": np.full(2, float(k))} for k in range(rows)]
                for batch in validation_share(iter(data), 3, rank, world_size):
                    assert 1 <= len(batch["row_index"]) <= 3
                    assert torch.equal(
                        batch["latent"][:, 0].long(), batch["row_index"]
                    )  # positions match rows
                    seen += batch["row_index"].tolist()
            assert sorted(seen) == list(range(rows))


@pytest.mark.slow
@pytest.mark.deadline(900)
def test_validation_loss_does_not_depend_on_the_number_of_workers(crop_latents, tmp_path, ray_session):
    five = _first_rows(crop_latents["train"], tmp_path / "five", 5)
    # lr 0 and no EMA: every run keeps the seeded initial weights, so all validate the same model.
    cfg = load_config(
        TINY_DIT, overrides=["training.n_epochs=1", "optim.lr=0", "training.use_ema=false", *QUIET]
    )
    data = {"train": crop_latents["train"], "val": five}
    # In-process (the loop alone) against 2 workers, which 5 rows do not divide.
    runs = {w: _train(cfg, "dit", data, tmp_path, f"w{w}", workers=w).metrics for w in (0, 2)}
    assert runs[2]["val_loss"] == pytest.approx(runs[0]["val_loss"], rel=1e-5)
    assert [m["val_samples"] for m in runs.values()] == [5, 5]
    # One validation row, two workers: one validates it, the other nothing.
    one = _first_rows(crop_latents["val"], tmp_path / "one", 1)
    single = _train(cfg, "dit", {**data, "val": one}, tmp_path, "one", workers=2).metrics
    assert single["val_samples"] == 1 and math.isfinite(single["val_loss"])


@pytest.mark.slow
def test_tiny_vqgan_and_voldit_overfit_real_ct_crops(crops, crop_latents, tmp_path, ray_session, capsys):
    # Validation on the training crops themselves: the figure a working loop must drive down.
    same = {"train": crops["train"], "val": crops["train"]}
    vq = [
        _train(
            load_config(
                CONFIGS / "tiny" / "vqgan.yaml",
                overrides=[
                    f"training.n_epochs={n}",
                    f"training.eval_freq={n}",
                    "stage1.adv_warmup_epochs=100",
                    # Unaugmented, so the run repeats exactly (random augmentation is not seeded): about
                    # one augmented run in 40 loses its encoder in its first steps and never learns.
                    "training.augment=false",
                    *QUIET,
                ],
            ),
            "vqgan",
            same,
            tmp_path,
            f"vq{n}",
        )
        for n in (1, 40)
    ]
    same = {"train": crop_latents["train"], "val": crop_latents["train"]}
    dit = [
        _train(
            load_config(TINY_DIT, overrides=[f"training.n_epochs={n}", f"training.eval_freq={n}", *QUIET]),
            "dit",
            same,
            tmp_path,
            f"dit{n}",
        )
        for n in (1, 120)
    ]
    with capsys.disabled():
        print(
            f"\n  VQ-GAN reconstruction L1: {vq[0].metrics['val_loss']:.4f} after 5 steps -> "
            f"{vq[1].metrics['val_loss']:.4f} after {vq[1].metrics['step']} steps"
        )
        print(
            f"  VolDiT loss: {dit[0].metrics['val_loss']:.4f} after 5 steps -> "
            f"{dit[1].metrics['val_loss']:.4f} after {dit[1].metrics['step']} steps"
        )
    assert vq[1].metrics["val_loss"] < 0.7 * vq[0].metrics["val_loss"]
    assert dit[1].metrics["val_loss"] < 0.75 * dit[0].metrics["val_loss"]


def test_dit_encodes_images_online_with_a_frozen_vqgan(crops, crop_latents, tmp_path, ray_session):
    # The seed's --no_precomputed_latents: image CSVs in, the VQ-GAN encodes each batch on the worker.
    cfg = load_config(TINY_DIT, overrides=["training.n_epochs=1", *QUIET])
    result = _train(cfg, "dit", crops, tmp_path, "online", vqgan=str(crop_latents["vqgan"]))
    ckpt = load_checkpoint(result.latest, stage="dit")
    stored = load_info(crop_latents["train"]).scale_factor  # the same VQ-GAN's, from all ten crops
    assert ckpt.meta["scale_factor"] == pytest.approx(stored, rel=0.2)  # estimated from the first volumes
    assert ckpt.meta["step"] == 5 and math.isfinite(result.metrics["val_loss"])
