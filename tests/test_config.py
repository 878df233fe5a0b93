"""Layered configuration: defaults < profile < sovctl.toml < environment < flags, with provenance.

Unit tests of `sovctl.config.load` on real files in a per-test home; one layer per test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sovctl import config
from sovctl.errors import ConfigError
from sovctl.home import Home


@pytest.fixture
def home(sovctl_home: Path) -> Home:
    sovctl_home.mkdir(parents=True)
    return Home(sovctl_home)


def write_profile(home: Home, name: str, text: str) -> Path:
    path = home.root / "profiles" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults(home: Home) -> None:
    s = config.load(home, environ={})
    assert s.hub.endpoint == "https://huggingface.co"
    assert s.serve.port == 8088
    assert {s.source(k) for k, _ in s.items()} == {"default"}
    assert s.profile is None and dict(s.models) == {}
    assert not s.explicit("serve.port")
    assert not home.config_path.exists()  # loading writes nothing


def test_profile_layer(home: Home) -> None:
    write_profile(home, "edge", "[serve]\nport = 9000\nqueue_limit = 4\n"
                                "[models.chat]\nmodel = \"smol\"\nn_ctx = 2048\n")
    s = config.load(home, profile="edge", environ={})
    assert (s.serve.port, s.source("serve.port")) == (9000, "profile")
    assert s.source("serve.host") == "default"
    assert s.profile == "edge"
    assert s.models["chat"] == config.ModelSettings(model="smol", n_ctx=2048)


def test_profile_from_environment_and_profiles_dir(home: Home, tmp_path: Path) -> None:
    extra = tmp_path / "more-profiles"
    extra.mkdir()
    (extra / "lab.toml").write_text("[bench]\ncpu_watts = 35\n")
    s = config.load(home, environ={"SOVCTL_PROFILE": "lab", "SOVCTL_PROFILES_DIR": str(extra)})
    assert s.profile == "lab"
    assert (s.bench.cpu_watts, s.source("bench.cpu_watts")) == (35.0, "profile")


def test_config_file_layer_outranks_profile(home: Home) -> None:
    write_profile(home, "edge", "[serve]\nport = 9000\nqueue_limit = 4\n")
    home.config_path.write_text(
        'profile = "edge"\n[serve]\nport = 9100\n[hub]\nendpoint = "http://mirror:8089"\n'
    )
    s = config.load(home, environ={})
    assert s.profile == "edge"
    assert (s.serve.port, s.source("serve.port")) == (9100, "config")
    assert (s.serve.queue_limit, s.source("serve.queue_limit")) == (4, "profile")
    assert (s.hub.endpoint, s.source("hub.endpoint")) == ("http://mirror:8089", "config")


def test_environment_layer_outranks_config_file(home: Home) -> None:
    home.config_path.write_text("[serve]\nport = 9100\nhealth_interval = 1\n")
    s = config.load(home, environ={"SOVCTL_SERVE__PORT": "9200",
                                   "SOVCTL_SERVE__HEALTH_INTERVAL": "0.5"})
    assert (s.serve.port, s.source("serve.port")) == (9200, "env")
    assert (s.serve.health_interval, s.source("serve.health_interval")) == (0.5, "env")
    assert s.explicit("serve.port")


def test_flag_layer_outranks_everything(home: Home) -> None:
    write_profile(home, "edge", "[serve]\nport = 9000\n")
    home.config_path.write_text('profile = "edge"\n[serve]\nport = 9100\n')
    s = config.load(home, flags={"serve.port": 9300, "serve.host": None},
                    environ={"SOVCTL_SERVE__PORT": "9200"})
    assert (s.serve.port, s.source("serve.port")) == (9300, "flag")
    assert s.source("serve.host") == "default"  # a flag left unset is no flag


def test_hf_endpoint_is_an_alias_below_sovctl_hub_endpoint(home: Home) -> None:
    home.config_path.write_text('[hub]\nendpoint = "http://from-config:1"\n')
    s = config.load(home, environ={"HF_ENDPOINT": "http://from-hf-endpoint:2"})
    assert (s.hub.endpoint, s.source("hub.endpoint")) == ("http://from-hf-endpoint:2",
                                                                 "env")
    both = {"HF_ENDPOINT": "http://from-hf-endpoint:2", "SOVCTL_HUB__ENDPOINT": "http://sov:3"}
    assert config.load(home, environ=both).hub.endpoint == "http://sov:3"
    s = config.load(home, flags={"hub.endpoint": "http://flag:4"}, environ=both)
    assert (s.hub.endpoint, s.source("hub.endpoint")) == ("http://flag:4", "flag")
    # An empty variable counts as unset.
    s = config.load(home, environ={"HF_ENDPOINT": ""})
    assert s.source("hub.endpoint") == "config"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[serve\nport = 1\n", "is not valid TOML"),
        ("[serve]\nport = \"eighty\"\n", "serve.port must be a int"),
        ("[serve]\nport = true\n", "serve.port must be a int"),
        ("[nope]\n", "unknown section [nope]"),
        ("[serve]\nportt = 1\n", "unknown setting serve.portt"),
        ("models = 3\n", "[models] must be a table"),
        ("[models.chat]\nrole = \"poet\"\n", "role must be chat, embedding, completion or rerank"),
        ("[models.chat]\nn_ctx = \"big\"\n", "models.chat.n_ctx must be a int"),
        ("[models.chat]\ncolour = 1\n", "unknown setting models.chat.colour"),
        ('profile = "../etc"\n', "is not valid"),
        ('profile = "absent"\n', "profile 'absent' not found"),
    ],
)
def test_malformed_config_is_an_error_and_left_untouched(home: Home, text: str,
                                                         needle: str) -> None:
    home.config_path.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(home, environ={})
    assert needle in e.value.message
    assert home.config_path.read_text() == text


def test_bad_environment_value(home: Home) -> None:
    with pytest.raises(ConfigError) as e:
        config.load(home, environ={"SOVCTL_SERVE__PORT": "eighty"})
    assert "environment SOVCTL_SERVE__PORT" in e.value.message


def test_env_name() -> None:
    assert config.env_name("serve.queue_limit") == "SOVCTL_SERVE__QUEUE_LIMIT"
    assert config.env_name("hub.endpoint") == "SOVCTL_HUB__ENDPOINT"
