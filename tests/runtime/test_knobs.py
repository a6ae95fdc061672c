"""twilight's environment knobs: defaults, parsing, lazy reads, ``scope()``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from twilight import knobs

ENVS = [k.env for k in knobs.KNOBS.values()]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for env in ENVS + ["XDG_CACHE_HOME", "XDG_DATA_HOME"]:
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_defaults_follow_xdg_then_home(monkeypatch, tmp_path):
    home = tmp_path / "home"
    assert knobs.cache_dir() == home / ".cache" / "twilight"
    assert knobs.data_dir() == home / ".local" / "share" / "twilight"
    assert knobs.tuning_logs_dir() == home / ".local" / "share" / "twilight" / "tuning_logs"
    assert knobs.disable_compile() is False and knobs.debug() is False
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xc"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xd"))
    assert knobs.cache_dir() == tmp_path / "xc" / "twilight"
    assert knobs.tuning_logs_dir() == tmp_path / "xd" / "twilight" / "tuning_logs"


def test_read_lazily_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TWILIGHT_CACHE_DIR", str(tmp_path / "c"))
    assert knobs.cache_dir() == tmp_path / "c"
    monkeypatch.setenv("TWILIGHT_CACHE_DIR", "~/kernels")
    assert knobs.cache_dir() == tmp_path / "home" / "kernels"
    monkeypatch.setenv("TWILIGHT_DATA_DIR", str(tmp_path / "d"))
    assert knobs.tuning_logs_dir() == tmp_path / "d" / "tuning_logs"
    monkeypatch.setenv("TWILIGHT_TUNING_LOGS", str(tmp_path / "logs"))
    assert knobs.tuning_logs_dir() == tmp_path / "logs"


@pytest.mark.parametrize("text,value", [("1", True), ("yes", True), ("ON", True), ("true", True),
                                        ("0", False), ("", False), ("off", False),
                                        ("False", False)])
def test_bool_knobs_parse(monkeypatch, text, value):
    monkeypatch.setenv("TWILIGHT_DISABLE_COMPILE", text)
    assert knobs.disable_compile() is value


def test_bad_bool_names_the_knob(monkeypatch):
    monkeypatch.setenv("TWILIGHT_DEBUG", "maybe")
    with pytest.raises(knobs.KnobError, match="TWILIGHT_DEBUG='maybe'"):
        knobs.debug()


def test_scope_overrides_and_restores(monkeypatch, tmp_path):
    monkeypatch.setenv("TWILIGHT_DEBUG", "1")
    with knobs.scope(cache_dir=tmp_path / "s", disable_compile=True, debug=None):
        assert knobs.cache_dir() == tmp_path / "s"
        assert knobs.disable_compile() is True
        assert knobs.debug() is False  # None unsets: the default applies
    assert "TWILIGHT_CACHE_DIR" not in os.environ
    assert "TWILIGHT_DISABLE_COMPILE" not in os.environ
    assert os.environ["TWILIGHT_DEBUG"] == "1"


def test_scope_restores_after_an_exception(tmp_path):
    with pytest.raises(RuntimeError), knobs.scope(data_dir=tmp_path):
        raise RuntimeError
    assert "TWILIGHT_DATA_DIR" not in os.environ


def test_scope_rejects_unknown_knobs():
    with pytest.raises(TypeError, match="cache_dirr"), knobs.scope(cache_dirr="/x"):
        pass


def test_scope_reaches_child_processes(tmp_path):
    with knobs.scope(cache_dir=tmp_path / "child"):
        out = subprocess.run([sys.executable, "-c",
                              "import os; print(os.environ['TWILIGHT_CACHE_DIR'])"],
                             capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()) == tmp_path / "child"


def test_codegen_knobs_are_the_marked_subset(monkeypatch):
    assert knobs.codegen_knobs() == {}  # none affect codegen today
    fake = knobs.Knob("fake", "TWILIGHT_FAKE_CODEGEN", "bool", lambda: False, "doc", codegen=True)
    monkeypatch.setitem(knobs.KNOBS, "fake", fake)
    assert knobs.codegen_knobs() == {}  # unset knobs are left out
    monkeypatch.setenv("TWILIGHT_FAKE_CODEGEN", "1")
    assert knobs.codegen_knobs() == {"TWILIGHT_FAKE_CODEGEN": "1"}


def test_describe_lists_every_knob():
    text = knobs.describe()
    assert all(env in text for env in ENVS)
