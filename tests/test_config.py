"""gateway/config/: validation messages, loading, secrets and offline checks, the committed
sample; one section per module of the package."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fieldkit.units import parse_duration, parse_size
from gateway.config import GatewayConfig, check_config, load_config, parse_config, sample_config
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


# -- models: one line per problem, naming the field and the fix ---------------------------

def _problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def test_each_problem_is_one_line_naming_the_field():
    problems = _problems({
        "gateway_id": "bad id!",
        "site": {"url": "http://x"},
        "uplink": {"batch_max_delay": "soon"},
        "log": {"when_full": "explode"},
        "typo": 1,
    })
    assert len(problems) == 5
    joined = "\n".join(problems)
    assert "gateway_id:" in joined
    assert "site.url: 'http://x' must start with mqtt:// or mqtts://" in joined
    assert "uplink.batch_max_delay: 'soon' is not a duration" in joined
    assert "log.when_full:" in joined
    assert "typo: unknown field" in joined
    assert all("\n" not in p for p in problems)


def test_inline_secrets_are_refused():
    problems = _problems({"gateway_id": "g", "cloud": {"url": "mqtts://h:8883", "password": "x"}})
    assert problems == ["cloud: inline secret 'password' is not accepted; use password_file "
                        "(a path) or password_env (an environment variable name)"]


def test_plaintext_to_a_remote_cloud_needs_an_explicit_yes():
    problems = _problems({"gateway_id": "g", "cloud": {"url": "mqtt://broker.example.com"}})
    assert "use mqtts://" in problems[0]
    parse_config({"gateway_id": "g", "cloud": {"url": "mqtt://127.0.0.1:1884"}})
    parse_config({"gateway_id": "g", "cloud": {"url": "mqtt://b.example", "allow_plaintext": True}})


def test_downlink_mistakes_are_one_line_each():
    key = "A" * 43 + "="   # 32 bytes of base64
    cloud = {"url": "mqtt://127.0.0.1:1884"}
    assert _problems({"gateway_id": "g", "cloud": cloud,
                      "downlink": {"public_keys": ["not a key"]}}) == [
        "downlink.public_keys: public_keys[0]: not base64; copy the line `gateway cloud "
        "keygen` printed"]
    assert "has 32" in _problems({"gateway_id": "g", "downlink": {"public_keys": ["AAAA"]}})[0]
    assert "public_keys is empty" in _problems(
        {"gateway_id": "g", "cloud": cloud, "downlink": {"rules": True}})[0]
    assert "configure cloud:" in _problems(
        {"gateway_id": "g", "downlink": {"public_keys": [key], "rules": True}})[0]
    allow = [{"devices": "fan-*", "commands": ["set"]}]
    assert "set commands.key_file or commands.key_env" in _problems(
        {"gateway_id": "g", "cloud": cloud,
         "downlink": {"public_keys": [key], "allow": allow}})[0]
    assert "downlink.allow.0.commands:" in _problems(
        {"gateway_id": "g", "downlink": {"allow": [{"devices": "x", "commands": []}]}})[0]
    parse_config({"gateway_id": "g", "cloud": cloud, "commands": {"key_env": "K"},
                  "downlink": {"public_keys": [key], "allow": allow, "rules": True}})


def test_subscription_templates_are_checked():
    assert "exactly one {device}" in _problems(
        {"gateway_id": "g", "subscriptions": [{"topic": "a/b"}]})[0]
    assert "not + or #" in _problems(
        {"gateway_id": "g", "subscriptions": [{"topic": "a/{device}/#"}]})[0]
    assert "needs a {metric}" in _problems(
        {"gateway_id": "g", "subscriptions": [{"topic": "a/{device}", "format": "number"}]})[0]
    assert "same filter" in _problems({"gateway_id": "g", "subscriptions": [
        {"topic": "a/{device}/{metric}", "format": "number"}, {"topic": "a/{metric}/{device}"}]})[0]


def test_defaults_are_safe():
    cfg = GatewayConfig(gateway_id="g")
    assert cfg.cloud is None
    assert cfg.log.synchronous.value == "full"
    assert cfg.metrics.listen is not None and cfg.metrics.listen.startswith("127.0.0.1:")


def test_url_credentials_are_refused_without_echoing_them():
    problems = _problems({"gateway_id": "g", "site": {"url": "mqtt+ssl://gw1:s3cret@host:99"}})
    assert len(problems) == 1
    assert "credentials in the URL" in problems[0]
    assert "s3cret" not in problems[0]


@pytest.mark.parametrize(("section", "url"), [
    ("influx", "http://127.0.0.1:1/pre?u=admin&p=SECRETPW4#frag"),
    ("influx", "http://127.0.0.1:1#SECRETPW4"),
    ("influx", "ftp://127.0.0.1:1/?p=SECRETPW4"),
    ("site", "mqtt://127.0.0.1:1883/?p=SECRETPW4"),
    ("site", "tcp://127.0.0.1:1883/?p=SECRETPW4"),
    ("cloud", "mqtts://h:8883#SECRETPW4"),
])
def test_a_url_with_a_query_or_fragment_is_refused_without_echoing_it(section, url):
    problems = _problems({"gateway_id": "g", section: {"url": url}})
    assert len(problems) == 1 and problems[0].startswith(f"{section}.url: "), problems
    assert "SECRETPW4" not in problems[0] and "admin" not in problems[0]
    if section == "influx":
        assert "query string or fragment" in problems[0]
        assert "use username and password_file" in problems[0]


def test_a_url_without_port_uses_the_default_and_ipv6_listen_works():
    cfg = parse_config({"gateway_id": "g", "site": {"url": "mqtt://[::1]"},
                        "cloud": {"url": "mqtts://h"}, "metrics": {"listen": "[::1]:9108"}})
    assert (cfg.site.host, cfg.site.port) == ("::1", 1883)
    assert cfg.cloud is not None and cfg.cloud.port == 8883


def test_ranges_and_cross_checks():
    problems = _problems({"gateway_id": "g", "site": {"keepalive": "1d"},
                          "uplink": {"backoff_min": 0}, "log": {"max_age": "0s"}})
    assert [p.split(":")[0] for p in problems] == ["site.keepalive", "log.max_age",
                                                   "uplink.backoff_min"]
    problems = _problems({"gateway_id": "g", "log": {"max_bytes": "1MiB"},
                          "ingest": {"max_payload": "512KiB"}})
    assert "at least 4x ingest.max_payload" in problems[0]


@pytest.mark.parametrize(("text", "value"), [("256KiB", 262144), ("1GiB", 1024**3), ("10MB", 10**7),
                                             (512, 512), ("512B", 512)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize(("text", "value"), [("200ms", 0.2), ("30s", 30), ("5m", 300),
                                             ("1h", 3600), ("7d", 604800), (2, 2.0)])
def test_durations(text, value):
    assert parse_duration(text) == value


# -- loading: the YAML file ---------------------------------------------------------------

def test_load_config_bad_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("gateway_id: g\nsite: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems[0].startswith("line ")


@pytest.mark.parametrize(("text", "line", "key"), [
    ("gateway_id: a\nlog: {path: /tmp/x.db}\ngateway_id: b\n", 3, "gateway_id"),
    ("gateway_id: a\nsite:\n  url: mqtt://h:1\n  keepalive: 5s\n  url: mqtt://e:2\n", 5, "url"),
    ("gateway_id: a\ncloud: {url: 'mqtts://h', url: 'mqtts://e'}\n", 2, "url"),
])
def test_a_key_twice_in_the_config_is_refused_naming_key_and_line(tmp_path, text, line, key):
    from click.testing import CliRunner

    from gateway.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"line {line}: {key!r} appears twice in one mapping (which one was meant is "
        f"unknown); keep one"]
    for command in ("check", "run"):
        result = CliRunner().invoke(main, [command, "-c", str(path)])
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines() == [f"{path}: {info.value.problems[0]}"]


def test_yaml_merge_keys_still_override_without_counting_as_duplicates(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("gateway_id: g\ndevice_labels:\n  'gh-*': &n {zone: north, row: '1'}\n"
                    "  'gh-1*': {<<: *n, zone: south}\n")
    cfg = load_config(path)
    assert cfg.device_labels["gh-1*"] == {"zone": "south", "row": "1"}


# -- secrets and offline checks (`gateway check`) -----------------------------------------

def test_secrets_from_file_and_env(tmp_path, monkeypatch):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    pw.chmod(0o600)
    cfg = parse_config({"gateway_id": "g", "log": {"path": str(tmp_path / "l.db")},
                        "cloud": {"url": "mqtts://h", "username": "u", "password_file": str(pw)}})
    assert cfg.cloud is not None and cfg.cloud.password() == "s3cret"
    assert check_config(cfg) == []
    monkeypatch.setenv("FG_PW", "from-env")
    cfg = parse_config({"gateway_id": "g", "site": {"password_env": "FG_PW"}})
    assert cfg.site.password() == "from-env"


def test_check_reports_missing_files_without_leaking_secrets(tmp_path, monkeypatch):
    monkeypatch.delenv("NOPE", raising=False)
    cfg = parse_config({
        "gateway_id": "g",
        "log": {"path": str(tmp_path / "missing" / "l.db")},
        "site": {"password_env": "NOPE"},
        "cloud": {"url": "mqtts://h", "password_file": str(tmp_path / "nope"),
                  "ca_file": str(tmp_path / "ca.pem")},
    })
    problems = check_config(cfg)
    assert any(p.startswith("site.password: environment variable 'NOPE'") for p in problems)
    assert any(p.startswith("cloud.password: cannot read password") for p in problems)
    assert any(p.startswith("cloud.ca_file:") for p in problems)
    assert any(p.startswith("log.path: directory") for p in problems)


def test_unusable_tls_files_are_one_line_each(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate")
    cfg = parse_config({"gateway_id": "g", "log": {"path": str(tmp_path / "l.db")},
                        "cloud": {"url": "mqtts://h", "ca_file": str(ca)}})
    problems = check_config(cfg)
    assert len(problems) == 1
    assert problems[0].startswith("cloud.ca_file:") and "not a usable CA bundle" in problems[0]


def test_an_unreadable_password_does_not_hide_an_unusable_ca_bundle(tmp_path):
    # The TLS context was skipped when any problem of the link mentioned "_file", such as
    # the path of a missing password file; `run` then tripped over the CA bundle.
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate")
    cfg = parse_config({"gateway_id": "g", "log": {"path": str(tmp_path / "l.db")},
                        "cloud": {"url": "mqtts://h", "ca_file": str(ca),
                                  "password_file": str(tmp_path / "cloud_file.pw")}})
    fields = [p.split(":")[0] for p in check_config(cfg)]
    assert fields == ["cloud.password", "cloud.ca_file"]


@pytest.mark.parametrize(("field", "mode"), [
    ("commands.key_file", 0o644), ("cloud.password_file", 0o644), ("cloud.key_file", 0o644),
    ("site.password_file", 0o644), ("influx.password_file", 0o644),
    ("influx.token_file", 0o666)])
def test_a_secret_file_every_user_can_read_is_refused(tmp_path, field, mode):
    from click.testing import CliRunner

    from gateway.cli import main

    secret = tmp_path / "secret"
    secret.write_text("k3y-material\n")
    secret.chmod(mode)
    section, name = field.split(".")
    data: dict = {"gateway_id": "g", "log": {"path": str(tmp_path / "l.db")},
                  section: {name: str(secret)}}
    if name == "token_file":
        data["influx"].update(api="v2", org="o")
    if section == "cloud":
        data["cloud"]["url"] = "mqtt://127.0.0.1:1884"
        if name == "key_file":
            cert = tmp_path / "cert.pem"
            cert.write_text("x")
            data["cloud"]["cert_file"] = str(cert)
    problems = check_config(parse_config(data))
    assert f"{field}: {str(secret)!r} can be read or written by every user (mode {mode:04o}); " \
        f"run: chmod 600 {secret} (or 640 with the gateway's group)" in problems
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    for command in ("check", "run"):
        result = CliRunner().invoke(main, [command, "-c", str(path)])
        assert result.exit_code == 2, result.output
        assert f"{field}: " in result.stderr
        assert "k3y-material" not in result.output + result.stderr
    secret.chmod(0o640)  # group-readable (root:fieldgate) is how services share secrets
    assert not [p for p in check_config(parse_config(data)) if p.startswith(field)]


def test_log_path_that_is_a_directory(tmp_path):
    problems = check_config(parse_config({"gateway_id": "g", "log": {"path": str(tmp_path)}}))
    assert any(p.startswith("log.path:") and "is a directory" in p for p in problems)


# -- what `check` passed and `run` then tripped over --------------------------------------

@pytest.mark.parametrize(("section", "field", "value", "hint"), [
    ("metrics", "listen", "127.0.0.1:70000", "not 1-65535"),
    ("metrics", "listen", "nonsense", "is not host:port"),
    ("metrics", "listen", "127.0.0.1:", "not 1-65535"),
    ("site", "url", "mqtt://127.0.0.1:0", "port outside 1-65535"),
    ("site", "url", "mqtt://127.0.0.1:65536", "port outside 1-65535"),
    ("site", "url", "mqtt://bad host:1883", "not a host name"),
    ("site", "url", "mqtt://127.0.0.1:1883/topic", "has a path"),
    ("site", "client_id", "", "at least 1 character"),
    ("uplink", "batch_max_delay", float("inf"), "not a duration"),
    ("uplink", "batch_max_bytes", 0, "greater than or equal to 4096"),
    ("ingest", "max_payload", 0, "greater than or equal to 16"),
])
def test_check_and_run_refuse_what_run_would_trip_over(tmp_path, section, field, value, hint):
    from click.testing import CliRunner

    from gateway.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"gateway_id": "g", "log": {"path": str(tmp_path / "l.db")},
                                    section: {field: value}}))
    for command in ("check", "run"):
        result = CliRunner().invoke(main, [command, "-c", str(path)])
        assert result.exit_code == 2, (command, result.output, result.exception)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"{path}: {section}.{field}: "), lines[0]
        assert hint in lines[0]


def test_check_and_run_report_a_rules_glob_matching_nothing_alike(tmp_path):
    from click.testing import CliRunner

    from gateway.cli import main

    pattern = str(tmp_path / "rules" / "*.yaml")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"gateway_id": "g", "log": {"path": str(tmp_path / "l.db")},
                                    "metrics": {"listen": None}, "rules": [pattern]}))
    seen = []
    for command in ("check", "run"):
        result = CliRunner().invoke(main, [command, "-c", str(path)])
        seen.append((result.exit_code, result.stderr.strip().splitlines()))
    assert seen[0] == seen[1] == (2, [f"{path}: rules: {pattern!r} matches no file"])


# -- sample: generated from the models, committed -----------------------------------------

def test_committed_sample_matches_the_models():
    committed = (ROOT / "deploy" / "gateway.example.yaml").read_text()
    assert committed == sample_config(), "run: gateway config sample > deploy/gateway.example.yaml"


def test_sample_is_a_valid_config():
    cfg = parse_config(yaml.safe_load(sample_config()))
    assert cfg.gateway_id == "gh-site-1"
    assert cfg.uplink.batch_max_delay == 0.2
    assert cfg.log.max_bytes == 1024**3


# -- layout -------------------------------------------------------------------------------

def test_the_config_modules_import_one_way_down_the_list_in_its_docstring():
    import ast
    import re

    import gateway.config

    order = re.findall(r"^    ([a-z]+) {2,}", gateway.config.__doc__ or "", re.MULTILINE)
    package = ROOT / "gateway" / "config"
    assert sorted(order) == sorted(p.stem for p in package.glob("*.py") if p.stem != "__init__")
    for name in order:
        tree = ast.parse((package / f"{name}.py").read_text())
        imported = {node.module.removeprefix("gateway.config.") for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module
                    and node.module.startswith("gateway.config")}
        assert "gateway.config" not in imported, f"{name} imports the package's face"
        up = {m for m in imported if order.index(m) <= order.index(name)}
        assert not up, f"gateway/config/{name}.py imports {up}, listed above it"


def test_check_names_a_rules_dir_that_is_not_a_directory(tmp_path):
    taken = tmp_path / "rules"
    taken.write_text("a file where the deployed versions would go")
    cfg = parse_config({"gateway_id": "g", "cloud": {"url": "mqtt://127.0.0.1:1884"},
                        "log": {"path": str(tmp_path / "log.db")},
                        "downlink": {"public_keys": ["A" * 43 + "="], "rules": True}})
    assert check_config(cfg) == [f"downlink.rules_dir: {str(taken)!r} is not a directory; "
                                 "remove it or choose another rules_dir"]
