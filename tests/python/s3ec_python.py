"""The official S3 Encryption Client for Python (amazon-s3-encryption-client-python 4.x, from
PyPI), for the interop tests in tests/it/s3_encryption.rs: its KMS keyring's client is
pointed at wrapd's AWS KMS API and its S3 client at the local S3 server, by standard client
options only.

    python3 s3ec_python.py put|get BUCKET KEY FILE CONTEXT_JSON v2|v3

v2 writes ALG_AES_256_GCM_IV12_TAG16_NO_KDF (commitment policy FORBID_ENCRYPT_ALLOW_DECRYPT),
v3 the client's default ALG_AES_256_GCM_HKDF_SHA512_COMMIT_KEY; reads allow both.
Environment: S3_URL, WRAPD_AWS_URL, WRAPD_CA, KEY_ARN, and the wrapd-dev AWS profile files.
"""
import json
import os
import sys

import boto3
from s3_encryption import S3EncryptionClient, S3EncryptionClientConfig
from s3_encryption.materials.kms_keyring import KmsKeyring
from s3_encryption.materials.materials import AlgorithmSuite, CommitmentPolicy

mode, bucket, key, path, context_json, fmt = sys.argv[1:7]
kms = boto3.Session(profile_name="wrapd-dev").client(
    "kms",
    endpoint_url=os.environ["WRAPD_AWS_URL"],
    region_name="us-east-1",
    verify=os.environ["WRAPD_CA"],
)
s3 = boto3.client(
    "s3",
    endpoint_url=os.environ["S3_URL"],
    region_name="us-east-1",
    aws_access_key_id="test",
    aws_secret_access_key="test",
)
if fmt == "v2":
    algorithm = AlgorithmSuite.ALG_AES_256_GCM_IV12_TAG16_NO_KDF
    policy = CommitmentPolicy.FORBID_ENCRYPT_ALLOW_DECRYPT
else:
    algorithm = AlgorithmSuite.ALG_AES_256_GCM_HKDF_SHA512_COMMIT_KEY
    policy = CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT
client = S3EncryptionClient(
    s3,
    S3EncryptionClientConfig(
        keyring=KmsKeyring(kms_client=kms, kms_key_id=os.environ["KEY_ARN"]),
        encryption_algorithm=algorithm,
        commitment_policy=policy,
    ),
)
context = json.loads(context_json)
extra = {"EncryptionContext": context} if context else {}
if mode == "put":
    with open(path, "rb") as f:
        client.put_object(Bucket=bucket, Key=key, Body=f.read(), **extra)
elif mode == "get":
    body = client.get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
    with open(path, "wb") as f:
        f.write(body)
else:
    sys.exit(f"unknown mode {mode}")
print(json.dumps({"ok": mode}))
