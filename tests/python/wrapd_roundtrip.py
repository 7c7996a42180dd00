"""Interop with a real daemon: the official SDK with examples/python/wrapd_esdk.py.

    python3 wrapd_roundtrip.py encrypt SOCKET KEY SUITE IN OUT
    python3 wrapd_roundtrip.py decrypt SOCKET IN OUT
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "python"))

import aws_encryption_sdk  # noqa: E402
from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy  # noqa: E402
from wrapd_esdk import WrapdMasterKeyProvider  # noqa: E402


def main():
    mode, socket = sys.argv[1], sys.argv[2]
    provider = WrapdMasterKeyProvider(target="unix://" + socket)
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    if mode == "encrypt":
        key, suite, src, dst = sys.argv[3:7]
        provider.add_master_key(key)
        algorithm = {
            "0478": Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
            "0578": Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384,
        }[suite]
        with open(src, "rb") as f:
            data = f.read()
        out, _ = client.encrypt(
            source=data, key_provider=provider, algorithm=algorithm,
            encryption_context={"tenant": "acme"},
        )
    else:
        src, dst = sys.argv[3:5]
        with open(src, "rb") as f:
            data = f.read()
        out, header = client.decrypt(source=data, key_provider=provider)
        assert header.encryption_context.get("tenant") == "acme", header.encryption_context
    with open(dst, "wb") as f:
        f.write(out)


if __name__ == "__main__":
    main()
