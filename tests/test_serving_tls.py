"""TLS: the shipped nginx reverse-proxy config (deploy/nginx-raddiag.conf) in front of serve.py,
and serve.py's own --ssl-keyfile/--ssl-certfile (uvicorn's TLS), each checked with a self-signed
certificate made in the test."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from live_server import free_port
from serving_helpers import ROOT, bearer, make_users, start_serve, write_image, write_stub_app

SITE = ROOT / "deploy" / "nginx-raddiag.conf"


def self_signed(folder: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    crt, pem = folder / "cert.pem", folder / "key.pem"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    base = tmp_path_factory.mktemp("tls")
    app = write_stub_app(base / "app")
    (base / "studies").mkdir()
    write_image(base / "studies" / "ct1.nii.gz")
    tokens = make_users(base / "auth.json")
    crt, key = self_signed(base)
    return {"base": base, "app": app, "tokens": tokens, "crt": crt, "key": key}


def nginx_config(backend, upstream_port, https_port, http_port):
    """The shipped site file with only ports, certificate and log paths changed, in a minimal main config."""
    base = backend["base"]
    site = SITE.read_text()
    site = site.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};")
    site = re.sub(r"listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;", site)
    site = re.sub(r"listen 80;", f"listen 127.0.0.1:{http_port};", site)
    site = site.replace("/etc/ssl/certs/raddiag.crt", str(backend["crt"]))
    site = site.replace("/etc/ssl/private/raddiag.key", str(backend["key"]))
    site = site.replace("/var/log/nginx/raddiag.access.log", str(base / "access.log"))
    assert site.count(str(base)) >= 4, "the shipped config changed shape; update this test"
    (base / "raddiag.conf").write_text(site)
    temp = base / "nginx-temp"
    temp.mkdir(exist_ok=True)
    main = f"""
        {"user root;" if os.geteuid() == 0 else ""}
        worker_processes 1;
        pid {base}/nginx.pid;
        error_log {base}/error.log;
        events {{ worker_connections 64; }}
        http {{
            client_body_temp_path {temp}/body; proxy_temp_path {temp}/proxy; fastcgi_temp_path {temp}/fcgi;
            uwsgi_temp_path {temp}/uwsgi; scgi_temp_path {temp}/scgi;
            include {base}/raddiag.conf;
        }}
    """
    (base / "nginx.conf").write_text(main)
    return base / "nginx.conf"


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (run scripts/install_system_deps.sh)")
def test_nginx_tls_proxy_config_serves_the_api_over_https(backend):
    tokens = backend["tokens"]
    server = start_serve(backend["app"], backend["base"] / "studies", backend["base"] / "auth.json", tokens["user"])
    https_port, http_port = free_port(), free_port()
    conf = nginx_config(backend, server.url.rsplit(":", 1)[1], https_port, http_port)
    check = subprocess.run(["nginx", "-t", "-c", str(conf), "-p", str(backend["base"])], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(backend["base"]), "-g", "daemon off;"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"https://127.0.0.1:{https_port}"
        verify = str(backend["crt"])
        for _ in range(100):
            try:
                requests.get(url + "/health", verify=verify, timeout=2)
                break
            except requests.RequestException:
                time.sleep(0.1)
        assert requests.get(url + "/health", verify=verify, timeout=10).json() == {"status": "ok"}
        assert requests.get(url + "/info/", verify=verify, timeout=10).status_code == 401
        info = requests.get(url + f"/info/?token={tokens['admin']}", headers=bearer(tokens["user"]), verify=verify,
                            timeout=10)
        assert info.status_code == 200 and "raddiagseg" in info.json()["models"]
        with open(backend["base"] / "studies" / "ct1.nii.gz", "rb") as f:  # a multipart upload through the proxy
            reply = requests.post(url + "/infer/raddiagseg?output=json", headers=bearer(tokens["user"]),
                                  files={"file": ("ct.nii.gz", f)}, verify=verify, timeout=60)
        assert reply.status_code == 200 and reply.json()["voxels"] > 0
        with pytest.raises(requests.exceptions.SSLError):  # the certificate is checked
            requests.get(url + "/health", timeout=10, verify=True)
        plain = requests.get(f"http://127.0.0.1:{http_port}/info/", allow_redirects=False, timeout=10)
        assert plain.status_code == 301 and plain.headers["location"].startswith("https://")
    finally:
        nginx.terminate()
        nginx.wait(timeout=20)
        server.stop()
    log = (backend["base"] / "access.log").read_text()
    assert "/infer/raddiagseg" in log
    for token in tokens.values():
        assert token not in log and token not in server.log_path.read_text()


def test_serve_py_ssl_flags_serve_https_only(backend):
    """serve.py --ssl-keyfile/--ssl-certfile: the API answers over HTTPS with the given certificate,
    plain HTTP on the same port gets no answer, and tokens stay out of the log."""
    import serving_helpers
    from live_server import ServerHandle

    tokens, base = backend["tokens"], backend["base"]
    port = free_port()
    command = [sys.executable, str(serving_helpers.SERVE), "--app", str(backend["app"]), "--studies",
               str(base / "studies"), "--port", str(port), "--auth-config", str(base / "auth.json"),
               "--ssl-keyfile", str(backend["key"]), "--ssl-certfile", str(backend["crt"])]
    log = base / "uvicorn-tls.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "MONAI_LABEL_TRACKING_ENABLED": "false"})
    handle = ServerHandle(url=f"https://127.0.0.1:{port}", process=process, log_path=log)
    verify = str(backend["crt"])
    try:
        reply, deadline = None, time.time() + 120
        while reply is None and time.time() < deadline:
            try:
                reply = requests.get(handle.url + "/info/", headers=bearer(tokens["user"]), verify=verify, timeout=5)
            except requests.RequestException:
                assert handle.alive(), handle.log()
                time.sleep(0.3)
        assert reply is not None and reply.status_code == 200, handle.log()
        assert "raddiagseg" in reply.json()["models"]
        assert requests.get(handle.url + "/info/", verify=verify, timeout=10).status_code == 401
        with open(base / "studies" / "ct1.nii.gz", "rb") as f:
            reply = requests.post(handle.url + "/infer/raddiagseg?output=json", headers=bearer(tokens["admin"]),
                                  files={"file": ("ct.nii.gz", f)}, verify=verify, timeout=60)
        assert reply.status_code == 200 and reply.json()["voxels"] > 0, reply.text
        with pytest.raises(requests.exceptions.SSLError):  # an unknown certificate is refused by default
            requests.get(handle.url + "/health", timeout=10)
        with pytest.raises(requests.exceptions.ConnectionError):  # no plain-HTTP answer on the TLS port
            requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
        assert handle.alive()
    finally:
        handle.stop()
    text = log.read_text(errors="replace")
    assert "POST /infer/raddiagseg" in text
    for token in tokens.values():
        assert token not in text


def test_serve_py_needs_both_ssl_flags(backend):
    only_key = subprocess.run([sys.executable, str(ROOT / "MONAILabelApp" / "serve.py"), "--studies",
                               str(backend["base"] / "studies"), "--auth-config", str(backend["base"] / "auth.json"),
                               "--ssl-keyfile", str(backend["key"])], capture_output=True, text=True, timeout=60)
    assert only_key.returncode == 2 and "--ssl-certfile" in only_key.stderr
