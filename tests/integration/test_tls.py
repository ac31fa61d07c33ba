"""TLS with client-certificate authentication, certificates made at test time."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from etcd_patterns import EtcdPatterns, PermissionDeniedError
from etcd_patterns.testing import EtcdCluster, TlsFiles, make_tls_files


@pytest.fixture(scope="module")
def secure() -> Iterator[EtcdCluster]:
    with EtcdCluster(tls=True) as cluster:
        yield cluster


def files(cluster: EtcdCluster) -> TlsFiles:
    assert cluster.tls_files is not None
    return cluster.tls_files


def test_every_pattern_over_tls_with_a_client_certificate(secure: EtcdCluster) -> None:
    tls = files(secure)
    assert secure.nodes[0].client_url.startswith("https://")
    with EtcdPatterns.connect(
        secure.endpoints,
        ca_cert=tls.ca_cert,
        cert_key=tls.client_key,
        cert_cert=tls.client_cert,
        namespace="/tls/",
    ) as etcd:
        assert etcd.transform("n", lambda v: str(int(v) + 1), default="0") == "1"
        assert etcd.lock("L", lambda: etcd.get_values("n")) == ["1"]
        etcd.enqueue("q", "over tls")
        with etcd.claim("q") as item:
            assert item.value == "over tls"
        with secure.count_rpcs() as rpcs:  # metrics stay on plain HTTP
            etcd.get_values("n")
        assert rpcs.kv == 1


def test_without_a_client_certificate_the_handshake_is_refused(secure: EtcdCluster) -> None:
    with (
        EtcdPatterns.connect(secure.endpoints, ca_cert=files(secure).ca_cert) as etcd,
        pytest.raises(PermissionDeniedError, match="TLS handshake"),
    ):
        etcd.get_values("n")


def test_a_certificate_from_another_ca_is_refused(secure: EtcdCluster, tmp_path: Path) -> None:
    stranger = make_tls_files(tmp_path / "other-ca")
    with (
        EtcdPatterns.connect(
            secure.endpoints,
            ca_cert=files(secure).ca_cert,
            cert_key=stranger.client_key,
            cert_cert=stranger.client_cert,
        ) as etcd,
        pytest.raises(PermissionDeniedError, match="TLS handshake"),
    ):
        etcd.get_values("n")


def test_the_cli_speaks_tls_with_its_flags(secure: EtcdCluster) -> None:
    tls = files(secure)

    def cli(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *(sys.executable, "-m", "etcd_patterns", *flags),
                *(f"--endpoints={secure.endpoints[0]}", "--namespace=/tls-cli/"),
                *("--request-timeout=2", "transform", "n", "--incr", "1"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    ok = cli(f"--cacert={tls.ca_cert}", f"--cert={tls.client_cert}", f"--key={tls.client_key}")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "1\n"
    without_certificate = cli(f"--cacert={tls.ca_cert}")
    assert without_certificate.returncode == 1
    assert "TLS handshake" in without_certificate.stderr
