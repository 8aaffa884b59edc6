import json
import subprocess
import sys

from tests.conftest import ROOT
from voldit.cli import main


def test_info_reports_l4_parameters(capsys):
    assert main(["info", "configs/transformer/dit_ds8_l4.yaml"]) == 0
    out = capsys.readouterr().out
    assert "579,185,792" in out and "2,048" in out and "TFLOP" in out


def test_info_json_for_tgca_and_vqgan(capsys):
    assert main(["info", "configs/transformer/dit_ds8_l4.yaml", "--json"]) == 0
    dit = json.loads(capsys.readouterr().out)
    # The MFU's numerator: a backward pass costs two forwards wherever every weight learns (all but the
    # first layer's input gradient, which nothing needs).
    assert 2.99 < dit["training_flops"] / dit["forward_flops"] < 3.0
    assert main(["info", "configs/transformer/dit_ds8_l4.yaml", "configs/tgca/tgca_ds8.yaml", "--json"]) == 0
    tgca = json.loads(capsys.readouterr().out)
    assert tgca["trainable_parameters"] == 4_424_865
    # The frozen VolDiT passes gradients back to the adapter but computes none for its own weights:
    # backward costs about one forward for its linear layers (two for attention), not two (measured 2.41x).
    assert dit["training_flops"] < tgca["training_flops"] < 2.5 * tgca["forward_flops"]
    assert main(["info", "configs/stage1/vqgan_ds8.yaml", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_parameters"] == 95_568_649 and info["latent_shape"] == [8, 64, 64, 32]


def test_config_validate_and_show(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dit:\n  params:\n    hidden_size: 100\n")
    assert main(["config", "validate", "configs/tiny/dit.yaml", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "ok      configs/tiny/dit.yaml" in out and "not divisible by dit.params.num_heads" in out
    assert main(["config", "show"]) == 0
    assert "condition_dropout_prob" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "voldit", "info", "configs/tiny/dit.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and "trainable parameters" in result.stdout


def test_sampler_flag_takes_dpmpp_and_eta_only_with_ddim(tmp_path, capsys):
    from voldit.cli import build_parser
    from voldit.cli.generate import _settings

    for verb in (["sample", "--checkpoint", "c"], ["synthesize", "--csv", "m.csv", "--tgca", "c"]):
        args = build_parser().parse_args(
            [*verb, "--output", str(tmp_path), "--sampler", "dpmpp", "--steps", "20"]
        )
        settings = _settings(args)
        assert settings.recorded() == {"sampler": "dpmpp", "steps": 20, "eta": 0.0, "guidance": 1.0}
    # eta would be recorded with the volumes although dpmpp never reads it: refused before any work.
    argv = ["sample", "--checkpoint", "c", "--output", str(tmp_path), "--sampler", "dpmpp", "--eta", "0.5"]
    assert main(argv) == 2
    assert "eta is DDIM's noise; the dpmpp sampler takes none" in capsys.readouterr().err
