"""A real S3 server on 127.0.0.1 for the tests: moto's standalone server (`moto[server]`), a subprocess that
speaks the S3 REST API. s3fs reaches it through AWS_ENDPOINT_URL and the usual AWS_* variables, exactly as it
would reach AWS: no code of ours knows it is a test."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

from conftest import free_port

BUCKET = "dist-gpt-test"



class S3Server:
    """moto's server on one port: start(), stop() and start() again (the same port: an outage and its end)."""

    def __init__(self, port: int | None = None, enforce_auth: bool = False):
        """enforce_auth: check the access key against moto's own IAM (then any key we invent is wrong)."""
        self.port = port or free_port()
        self.enforce_auth = enforce_auth
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables a client needs (the key and secret are anything: moto accepts any unless auth is on)."""
        return {
            "AWS_ACCESS_KEY_ID": "testing-key-id",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-print",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def start(self) -> S3Server:
        env = dict(os.environ)
        if self.enforce_auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1)
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"moto.server exited {self.proc.returncode}")
                time.sleep(0.1)
        raise RuntimeError("moto.server did not answer within 30 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def create_bucket(self, name: str = BUCKET) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y").create_bucket(Bucket=name)
        return name
