"""Writes tests/vectors/sigv4-kms.json: one AWS KMS request signed by botocore (the signer
every Python AWS tool uses) with a test key, for the SigV4 verification benchmark
(benches/sigv4.rs) and its known-answer check. Run again only to refresh it."""

import datetime
import json
import pathlib
from unittest import mock

import botocore.auth
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
WHEN = datetime.datetime(2026, 11, 23, 10, 0, 0)

body = json.dumps({"CiphertextBlob": "V1JQRAEka2V5Lw==" * 8, "EncryptionContext": {"tenant": "acme"}})
request = AWSRequest(
    method="POST",
    url="https://127.0.0.1:4443/",
    data=body,
    headers={"X-Amz-Target": "TrentService.Decrypt", "Content-Type": "application/x-amz-json-1.1"},
)
with mock.patch.object(botocore.auth, "get_current_datetime", return_value=WHEN):
    SigV4Auth(Credentials(ACCESS_KEY, SECRET), "kms", "us-east-1").add_auth(request)
fixture = {
    "access_key": ACCESS_KEY,
    "secret": SECRET,
    "headers": dict(request.headers.items()) | {"Host": "127.0.0.1:4443"},
    "body": body,
}
out = pathlib.Path(__file__).with_name("sigv4-kms.json")
out.write_text(json.dumps(fixture, indent=2) + "\n")
print(out)
