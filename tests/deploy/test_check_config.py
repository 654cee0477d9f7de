"""The ConfigMap's credgate.toml passes `credgate check-config` in the pod's file layout.

The files are laid out under a temp dir exactly as the Deployment mounts them
(/etc/credgate/... -> TMP/etc/credgate/...): the ConfigMap, the TLS Secret in
cert-manager's layout (filled from `credgate dev-pki`) and the AWS Secret with
one profile per configured caller, and (overlays/redis) the Redis password
Secret. credgate is started with the Deployment's own arguments and
environment, paths rewritten.

The redis tree needs a binary that understands [state] with url,
password_file and command_timeout; check-config (without --online) is
expected to validate them and the files they name without connecting to
Redis.
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from deploy_support import (
    EX_USAGE,
    KUSTOMIZE_TREES,
    aws_secret,
    config,
    dev_pki,
    lay_out_mounts,
    pod_argv,
    pod_env,
    rewrite,
    tls_secret_from_pki,
    uses_redis,
    uses_secrets_manager,
    volume_secret_name,
)

# The Redis AUTH password, as the operator's Secret `credgate-redis` holds it.
REDIS_SECRET = {"password": b"example-redis-password\n"}


def check_config_argv(objs, dockerfile, bin_path: Path, root: Path) -> list[str]:
    """The pod's own argv, with `serve` turned into `check-config`."""
    argv = [rewrite(a, root) for a in pod_argv(objs, dockerfile)]
    assert argv[1] == "serve"
    return [str(bin_path), "check-config", *argv[2:]]


def lay_out_pod(objs, root: Path, bin_path: Path, config_maps=None) -> None:
    callers = config(objs)["callers"]
    pki = dev_pki(bin_path, root / "pki", [c["spiffe_id"] for c in callers if "spiffe_id" in c])
    secrets = {volume_secret_name(objs, "tls"): tls_secret_from_pki(pki["dir"])}
    if not uses_secrets_manager(objs):
        profiles = {
            c["aws_profile"]: (f"AKIAEXAMPLE{i:09d}", f"example-secret-{i}") for i, c in enumerate(callers)
        }
        secrets[volume_secret_name(objs, "aws")] = aws_secret(profiles, config(objs)["aws"]["region"])
    if uses_redis(objs):
        secrets[volume_secret_name(objs, "redis")] = REDIS_SECRET
    lay_out_mounts(objs, root, secrets=secrets, config_maps=config_maps)


@pytest.mark.parametrize("tree", sorted(KUSTOMIZE_TREES))
def test_config_map_passes_check_config(rendered, tree, dockerfile, credgate_bin, tmp_path):
    objs = rendered[tree]
    lay_out_pod(objs, tmp_path, credgate_bin)
    argv = check_config_argv(objs, dockerfile, credgate_bin, tmp_path)
    proc = subprocess.run(argv, env=pod_env(objs, tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{argv}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def test_check_config_would_catch_a_broken_config_map(base_objects, dockerfile, credgate_bin, tmp_path):
    """The check above means something: an unknown key in the same layout exits 64."""
    objs = base_objects
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    broken = rewrite(cm["data"]["credgate.toml"], tmp_path).replace(
        "[server]\n", "[server]\nlisten_adress = \"0.0.0.0:9999\"\n", 1
    )
    tomllib.loads(broken)  # still valid TOML: only credgate can tell
    lay_out_pod(objs, tmp_path, credgate_bin, config_maps={cm["metadata"]["name"]: {"credgate.toml": broken}})
    argv = check_config_argv(objs, dockerfile, credgate_bin, tmp_path)
    proc = subprocess.run(argv, env=pod_env(objs, tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == EX_USAGE, f"{argv}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "listen_adress" in proc.stdout + proc.stderr


def test_check_config_needs_the_mounted_tls_files(base_objects, dockerfile, credgate_bin, tmp_path):
    """Without the TLS Secret's files (a missing or misnamed Secret), check-config fails."""
    objs = base_objects
    lay_out_pod(objs, tmp_path, credgate_bin)
    (tmp_path / "etc" / "credgate" / "tls" / "tls.key").unlink()
    argv = check_config_argv(objs, dockerfile, credgate_bin, tmp_path)
    proc = subprocess.run(argv, env=pod_env(objs, tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == EX_USAGE, f"{argv}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def test_check_config_needs_the_redis_password_file(rendered, dockerfile, credgate_bin, tmp_path):
    """In Redis mode the password is a mounted file: without it (Secret
    credgate-redis missing its key `password`), check-config fails."""
    objs = rendered["redis"]
    lay_out_pod(objs, tmp_path, credgate_bin)
    (tmp_path / "etc" / "credgate" / "redis" / "password").unlink()
    argv = check_config_argv(objs, dockerfile, credgate_bin, tmp_path)
    proc = subprocess.run(argv, env=pod_env(objs, tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == EX_USAGE, f"{argv}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "password" in proc.stdout + proc.stderr
