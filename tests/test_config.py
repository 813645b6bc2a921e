"""appliance.toml: defaults, validation messages, edits that keep comments."""

import pytest

from appliance.config import Config, ConfigError, load_config, parse_config, set_value

GiB = 1024**3


def test_missing_file_means_all_defaults(tmp_path):
    assert load_config(tmp_path / "nope.toml") == Config()


def test_values_are_typed():
    c = parse_config('[slots.cpu]\nmemory = "4GiB"\n[runner]\ndrain_timeout = "2m"\n[object_store]\nport = 9000\n')
    assert c.slots.cpu.memory == 4 * GiB
    assert c.runner.drain_timeout == 120.0
    assert c.object_store.port == 9000
    assert c.slots.cpu.shm == "auto"
    fleet = parse_config('[queues]\nunrunnable_after_refusals = 2\nunrunnable_after = "12h"\n').queues
    assert (fleet.unrunnable_after_refusals, fleet.unrunnable_after) == (2, 12 * 3600.0)
    assert (Config().queues.unrunnable_after_refusals, Config().queues.unrunnable_after) == (3, 86400.0)


@pytest.mark.parametrize("text, fragments", [
    ('[slots.cpu]\nmemroy = "4GiB"\n', ["unknown key 'slots.cpu.memroy'", "did you mean 'memory'"]),
    ('[isolation]\nbackend = "podman"\n', ["isolation.backend = 'podman'", "'process', 'docker'"]),
    ('[object_store]\nport = 70000\n', ["object_store.port = 70000", "above 65535"]),
    ('[slots.cpu]\nmemory = "lots"\n', ["slots.cpu.memory = 'lots'", "not a size"]),
    ('[host]\nreserved_cpus = -1\n', ["host.reserved_cpus = -1"]),
    ('slots = 3\n', ["'slots' must be a table"]),
    ('[queues]\nunrunnable_after_refusals = 0\n', ["queues.unrunnable_after_refusals = 0", "less than 1"]),
    ('[queues]\nunrunnable_after = "a day"\n', ["queues.unrunnable_after = 'a day'", "not a duration"]),
    ('[slots.cpu\n', ["not valid TOML"]),
])
def test_bad_config_names_the_key_the_value_and_the_fix(text, fragments):
    with pytest.raises(ConfigError) as err:
        parse_config(text, "/etc/x/appliance.toml")
    message = str(err.value)
    assert message.startswith("/etc/x/appliance.toml")
    for fragment in fragments:
        assert fragment in message


def test_set_keeps_comments_and_validates(tmp_path):
    path = tmp_path / "appliance.toml"
    path.write_text("# my box\n[slots.cpu]\n# one core each\ncpus = 1\n")
    set_value(path, "slots.cpu.memory", "2GiB")
    set_value(path, "isolation.backend", "docker")
    text = path.read_text()
    assert "# my box" in text and "# one core each" in text
    config = load_config(path)
    assert config.slots.cpu.memory == 2 * GiB
    assert config.isolation.backend == "docker"
    with pytest.raises(ConfigError, match="isolation.backend"):
        set_value(path, "isolation.backend", "podman")
    with pytest.raises(ConfigError, match="did you mean 'backend'"):
        set_value(path, "isolation.backnd", "docker")
    assert load_config(path).isolation.backend == "docker"  # a refused edit changed nothing


def test_set_list_value(tmp_path):
    path = tmp_path / "appliance.toml"
    set_value(path, "gpus.disabled", "0,GPU-abc")
    assert load_config(path).gpus.disabled == ("0", "GPU-abc")
