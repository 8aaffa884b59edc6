"""User errors: every error class voldit defines shares one base, which the command line prints as one
line with the class's exit code (no list of classes in the CLI to keep in step)."""

import importlib
import inspect
import pkgutil

import pytest

import voldit
from voldit.errors import VolditError


def _voldit_exceptions():
    found = {}
    for module in pkgutil.walk_packages(voldit.__path__, "voldit."):
        if module.name.endswith("__main__"):
            continue
        for name, obj in inspect.getmembers(importlib.import_module(module.name), inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("voldit."):
                found[f"{obj.__module__}.{name}"] = obj
    return found


def test_every_error_voldit_defines_is_a_user_error():
    found = _voldit_exceptions()
    assert len(found) >= 10  # config, checkpoint, manifest, latents, volume, storage, synthesis, ...
    assert [name for name, cls in found.items() if not issubclass(cls, VolditError)] == []


@pytest.mark.parametrize(
    ("error", "code"),
    [("voldit.storage.StorageError", 2), ("voldit.training.context.TrainingError", 1)],
)
def test_the_cli_prints_a_user_error_as_one_line_with_its_exit_code(error, code, monkeypatch, capsys):
    from voldit import cli

    module, name = error.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)

    def failing(args):
        raise cls("bucket 'x' does not exist; create it or fix --output")

    monkeypatch.setitem(cli._COMMANDS, "config show", failing)
    assert cli.main(["config", "show", "whatever.yaml"]) == code
    err = capsys.readouterr().err
    assert err == "voldit config show: error: bucket 'x' does not exist; create it or fix --output\n"
