"""The Linux installer: the systemd unit, install.sh / uninstall.sh and the starter config.

The binary itself is built and run by `make smoke` (installer/smoke.sh), not here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.app import check_exposure
from agent.config import load_config

REPO = Path(__file__).resolve().parent.parent
LINUX = REPO / "installer" / "linux"
UNIT = LINUX / "etims-agent.service"
INSTALL = LINUX / "install.sh"
UNINSTALL = LINUX / "uninstall.sh"
TEMPLATE = LINUX / "agent.toml"
BINARY = "/usr/local/bin/etims-agent"
CONFIG = "/etc/etims-agent/agent.toml"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                                           reason="systemd-analyze is not installed (apt-get install systemd)")


def unit_settings(text: str) -> dict[str, list[str]]:
    """`Key=value` lines per key (keys like DeviceAllow= repeat), section names dropped."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def systemd_root(tmp_path: Path, unit_text: str, *, with_binary: bool = True) -> Path:
    """A root directory for `systemd-analyze --root`: this machine's unit library, the unit as
    install.sh puts it, and (unless told otherwise) an executable at /usr/local/bin/etims-agent."""
    root = tmp_path / "root"
    for lib in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if lib.is_dir():
            shutil.copytree(lib, root / lib.relative_to("/"), symlinks=True)
            break
    else:
        pytest.skip("no systemd unit library (/usr/lib/systemd/system) to verify against")
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system/etims-agent.service").write_text(unit_text)
    if with_binary:
        stub = root / BINARY.lstrip("/")
        stub.parent.mkdir(parents=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    return root


def analyze(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run([SYSTEMD_ANALYZE, *args, f"--root={root}", "/etc/systemd/system/etims-agent.service"],
                          capture_output=True, text=True, timeout=60)


def unit_complaints(result: subprocess.CompletedProcess[str]) -> list[str]:
    """What systemd-analyze said about our unit (it exits 0 on ignored bad lines, so read them)."""
    return [line for line in (result.stdout + result.stderr).splitlines() if "etims-agent" in line]


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # The unit exactly as shipped, in a root where ExecStart's binary exists.
    result = analyze(systemd_root(tmp_path / "ok", UNIT.read_text()), "verify")
    assert result.returncode == 0 and not unit_complaints(result), result.stdout + result.stderr

    # The same check sees a missing binary, a misspelt key and a bad value: it is not a no-op.
    missing = analyze(systemd_root(tmp_path / "nobin", UNIT.read_text(), with_binary=False), "verify")
    assert missing.returncode != 0 and f"{BINARY} is not executable" in missing.stderr
    broken = UNIT.read_text().replace("ProtectHome=yes", "ProtectHome=maybe").replace(
        "LockPersonality=yes", "LockPersonalty=yes")
    complaints = unit_complaints(analyze(systemd_root(tmp_path / "bad", broken), "verify"))
    assert any("ProtectHome" in c or "protect home" in c.lower() for c in complaints), complaints
    assert any("LockPersonalty" in c for c in complaints), complaints


@needs_systemd_analyze
def test_unit_exposure_is_low(tmp_path: Path) -> None:
    result = analyze(systemd_root(tmp_path, UNIT.read_text()), "security", "--offline=yes", "--no-pager")
    found = re.search(r"Overall exposure level for etims-agent\.service: ([0-9.]+)", result.stdout)
    if found is None:
        pytest.skip(f"this systemd-analyze has no offline security report: {result.stderr.strip()[:200]}")
    assert float(found.group(1)) <= 2.0, result.stdout  # 1.5 when written; systemd calls < 2 "OK"


def test_unit_settings() -> None:
    s = unit_settings(UNIT.read_text())
    one = {key: values[-1] for key, values in s.items()}
    assert one["ExecStart"] == f"{BINARY} run --config {CONFIG}"
    assert one["User"] == one["Group"] == "etims-agent"
    assert one["StateDirectory"] == one["ConfigurationDirectory"] == "etims-agent"
    assert one["Restart"] == "on-failure" and one["RestartSec"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
                       "SystemCallArchitectures": "native", "CapabilityBoundingSet": "", "UMask": "0077",
                       "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "DevicePolicy": "closed",
                       "KillMode": "mixed"}.items():
        assert one.get(key) == value, f"{key}={one.get(key)!r}, expected {value!r}"
    assert set(one["SupplementaryGroups"].split()) == {"dialout", "lp"}
    assert {"char-ttyS rw", "char-ttyUSB rw", "char-ttyACM rw", "char-usb rw"} <= set(s["DeviceAllow"])
    # data_dir comes from the config file alone (see the unit's comment), never the environment.
    assert not any("ETIMS_AGENT_DATA_DIR" in value for value in s.get("Environment", []))


def test_starter_config_parses_and_passes_config_check() -> None:
    cfg = load_config(TEMPLATE, env={})
    assert cfg.data_dir == Path("/var/lib/etims-agent")
    assert cfg.http.host == "127.0.0.1" and cfg.http.is_loopback and cfg.http.till_token is None
    assert cfg.secrets.backend == "file"
    assert cfg.log.format == "logfmt"
    assert cfg.secrets_in_file == ()
    check_exposure(cfg)  # what `config check` and `run` refuse: a non-loopback bind without a token
    # The unit's StateDirectory= is the config's data_dir, and its ExecStart reads install.sh's path.
    settings = unit_settings(UNIT.read_text())
    assert Path("/var/lib") / settings["StateDirectory"][-1] == cfg.data_dir
    assert "CONFIG=$CONFIG_DIR/agent.toml" in INSTALL.read_text()
    assert f"--config {CONFIG}" in settings["ExecStart"][-1]


def test_starter_config_with_the_cli() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETIMS_AGENT_")}
    result = subprocess.run([sys.executable, "-m", "agent", "config", "check", "--config", str(TEMPLATE)],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^data_dir\s+/var/lib/etims-agent$", result.stdout, re.M), result.stdout
    assert re.search(r"^http\s+127\.0\.0\.1:8089 token=none", result.stdout, re.M), result.stdout
    assert "warning" not in result.stdout + result.stderr


@pytest.mark.parametrize("script", [INSTALL, UNINSTALL, REPO / "installer" / "smoke.sh"], ids=lambda p: p.name)
def test_scripts_parse(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script.read_text()


def dry_run(script: Path, *args: str) -> list[str]:
    result = subprocess.run(["bash", str(script), "--dry-run", *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith("+ ")], "a dry run executed something"
    return [line.removeprefix("would run: ") for line in lines]


def position(lines: list[str], pattern: str) -> int:
    for i, line in enumerate(lines):
        if re.search(pattern, line):
            return i
    raise AssertionError(f"no line matches {pattern!r} in:\n" + "\n".join(lines))


def test_install_dry_run_lists_the_steps(tmp_path: Path) -> None:
    binary = tmp_path / "etims-agent"
    binary.write_text("#!/bin/sh\n")
    lines = dry_run(INSTALL, "--binary", str(binary))
    steps = [
        r"^useradd --system .*--home-dir /var/lib/etims-agent .*--shell /usr/sbin/nologin .*etims-agent$"
        r"|user etims-agent exists, kept",
        rf"^install -D -m 0755 -o root -g root {re.escape(str(binary))} {BINARY}\.new$",
        rf"^mv -f {BINARY}\.new {BINARY}$",
        rf"^install -D -m 0644 -o root -g root {re.escape(str(UNIT))} /etc/systemd/system/etims-agent\.service$",
        rf"^install -m 0640 -o root -g etims-agent {re.escape(str(TEMPLATE))} {CONFIG}$|config {CONFIG} exists, kept",
        r"^install -d -m 0700 -o etims-agent -g etims-agent /var/lib/etims-agent$",
        rf"^runuser -u etims-agent -- {BINARY} config check --config {CONFIG}$",
        r"^systemctl daemon-reload$",
        r"^systemctl enable etims-agent\.service$",
        r"^systemctl restart etims-agent\.service$",
    ]
    found = [position(lines, step) for step in steps]
    assert found == sorted(found), "steps out of order:\n" + "\n".join(lines)

    no_start = dry_run(INSTALL, "--binary", str(binary), "--no-start")
    assert not any(line.startswith("systemctl restart") for line in no_start)
    position(no_start, r"^systemctl enable etims-agent\.service$")


def test_install_refuses_without_a_binary(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(INSTALL), "--binary", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "make dist" in result.stderr


def test_uninstall_dry_run_keeps_data_unless_purge() -> None:
    lines = dry_run(UNINSTALL)
    steps = [r"^systemctl disable --now etims-agent\.service$", r"^rm -f /etc/systemd/system/etims-agent\.service$",
             r"^systemctl daemon-reload$", rf"^rm -f {BINARY}$", r"kept data /var/lib/etims-agent"]
    found = [position(lines, step) for step in steps]
    assert found == sorted(found), "\n".join(lines)
    assert not any(re.search(r"^rm -rf|userdel", line) for line in lines)

    purge = dry_run(UNINSTALL, "--purge")
    position(purge, r"^rm -rf /var/lib/etims-agent /etc/etims-agent ")
    position(purge, r"^userdel etims-agent$")


# Inside a private mount namespace, /etc, /usr/local and /var/lib are overlays on the real ones
# (changes go to a temp dir and vanish with the namespace), systemctl is a stub that logs. The
# scripts run for real: user, files, modes, idempotence, uninstall, purge. Prints a JSON report.
NAMESPACE_SCRIPT = r"""
set -euo pipefail
T=$1; REPO=$2
for pair in etc:/etc usrlocal:/usr/local varlib:/var/lib; do
    name=${pair%%:*}; target=${pair#*:}
    mkdir -p "$T/$name/up" "$T/$name/work"
    mount -t overlay overlay -o "lowerdir=$target,upperdir=$T/$name/up,workdir=$T/$name/work" "$target" || exit 77
done
for target in /etc /usr/local /var/lib; do  # never go on unless all three are private overlays
    [[ $(findmnt -n -o FSTYPE --mountpoint "$target") == overlay ]] || exit 77
done
mkdir -p "$T/stub"
printf '#!/bin/sh\necho "$*" >> %s/systemctl.log\n[ "$1" != cat ] || [ -f "/etc/systemd/system/$2" ]\n' "$T" \
    > "$T/stub/systemctl"
printf '#!/bin/sh\nexit 0\n' > "$T/stub/journalctl"
# The binary: answers `config check` if its user can read the config, as the real one would.
printf '#!/bin/sh\n[ "$1 $2 $3" = "config check --config" ] && [ -r "$4" ] && echo "config OK ($4)"\n' \
    > "$T/etims-agent"
chmod +x "$T/stub/systemctl" "$T/stub/journalctl" "$T/etims-agent"
export PATH="$T/stub:$PATH"
sleep() { :; }; export -f sleep

mode() { stat -c '%a %U:%G' "$1"; }
bash "$REPO/installer/linux/install.sh" --binary "$T/etims-agent" > "$T/install1.log"
echo "# edited by the technician" >> /etc/etims-agent/agent.toml
bash "$REPO/installer/linux/install.sh" --binary "$T/etims-agent" > "$T/install2.log"
user=$(getent passwd etims-agent)
after_install=$(jq -n --arg user "$user" --arg bin "$(mode /usr/local/bin/etims-agent)" \
    --arg unit "$(mode /etc/systemd/system/etims-agent.service)" --arg config "$(mode /etc/etims-agent/agent.toml)" \
    --arg state "$(mode /var/lib/etims-agent)" --arg edited "$(tail -n 1 /etc/etims-agent/agent.toml)" \
    --arg same_unit "$(cmp -s /etc/systemd/system/etims-agent.service "$REPO/installer/linux/etims-agent.service" \
                       && echo yes)" \
    --rawfile install2 "$T/install2.log" --rawfile systemctl "$T/systemctl.log" \
    '{user: $user, bin: $bin, unit: $unit, config: $config, state: $state, edited: $edited, same_unit: $same_unit,
      install2: $install2, systemctl: $systemctl}')
touch /var/lib/etims-agent/outbox.sqlite3
bash "$REPO/installer/linux/uninstall.sh" > "$T/uninstall.log"
bash "$REPO/installer/linux/uninstall.sh" >> "$T/uninstall.log"
kept=$(ls /var/lib/etims-agent /etc/etims-agent | tr '\n' ' ')
gone=$( (ls /usr/local/bin/etims-agent /etc/systemd/system/etims-agent.service 2>/dev/null || true) | wc -l)
bash "$REPO/installer/linux/uninstall.sh" --purge --yes > "$T/purge.log"
purged=$( (ls -d /var/lib/etims-agent /etc/etims-agent 2>/dev/null || true) | wc -l)
user_after=$(getent passwd etims-agent || true)
jq -n --argjson install "$after_install" --arg kept "$kept" --arg gone "$gone" --arg purged "$purged" \
    --arg user_after "$user_after" \
    '{install: $install, kept: $kept, gone: $gone, purged: $purged, user_after: $user_after}'
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0, reason="needs root on Linux for a mount namespace")
def test_install_and_uninstall_for_real_in_a_private_namespace(tmp_path: Path) -> None:
    for tool in ("unshare", "findmnt", "jq", "useradd", "runuser"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    script = tmp_path / "ns.sh"
    script.write_text(NAMESPACE_SCRIPT)
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", str(script),
                             str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=120)
    if result.returncode == 77 or "unshare failed" in result.stderr:
        pytest.skip(f"no private overlay mounts here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    done = report["install"]
    assert re.fullmatch(r"etims-agent:x:\d+:\d+:[^:]*:/var/lib/etims-agent:/usr/sbin/nologin", done["user"])
    assert done["bin"] == "755 root:root"
    assert done["unit"] == "644 root:root" and done["same_unit"] == "yes"
    assert done["config"] == "640 root:etims-agent"
    assert done["state"] == "700 etims-agent:etims-agent"
    # The second run kept the user and the edited config, checked it as the service user, restarted.
    assert done["edited"] == "# edited by the technician"
    assert "user etims-agent exists, kept" in done["install2"]
    assert f"config {CONFIG} exists, kept" in done["install2"]
    assert f"config OK ({CONFIG})" in done["install2"]
    assert done["systemctl"].splitlines().count("restart etims-agent.service") == 2
    assert done["systemctl"].splitlines().count("enable etims-agent.service") == 2
    # uninstall (twice): binary and unit gone, data and config kept; --purge removes those and the user.
    assert report["gone"] == "0"
    assert "outbox.sqlite3" in report["kept"] and "agent.toml" in report["kept"]
    assert report["purged"] == "0" and report["user_after"] == ""
