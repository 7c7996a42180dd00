"""Known-answer vectors for wrapd's Encryption SDK message format, made by the official
AWS Encryption SDK for Python (not by wrapd), so that tests/esdk_vectors.rs checks wrapd
against an independent implementation without Python at test time.

Each vector fixes the inputs the SDK normally draws at random: the data key (a static master
key hands it out) and the message id (the SDK's message_id() is replaced). The derived data
key and the commitment key are computed here with `cryptography`'s HKDF, independently of
both implementations. Signed (0x0578) vectors are decrypt-only: ECDSA signatures are
randomized.

    python3 tests/vectors/generate.py > tests/vectors/esdk-v2.json
"""
import json
import os
import sys

import aws_encryption_sdk
import aws_encryption_sdk.internal.utils as sdk_utils
from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from esdk_static_key import StaticMasterKey  # noqa: E402  (the interop tests' master key)

PROVIDER_INFO = b"key/00112233445566778899aabbccddeeff"
EDK = bytes(range(100))


def hkdf(message_id, dek, info):
    return HKDF(algorithm=hashes.SHA512(), length=32, salt=message_id, info=info).derive(dek)


def plaintext(n):
    return bytes((i * 31) % 251 for i in range(n))


VECTORS = [
    # name, suite, frame length, plaintext length, context
    ("three-frames", "0478", 4096, 10000, {"tenant": "acme", "purpose": "kat"}),
    ("exact-multiple", "0478", 1024, 3072, {"tenant": "acme"}),
    ("empty", "0478", 4096, 0, {"tenant": "acme"}),
    ("no-context", "0478", 512, 700, {}),
    ("signed", "0578", 4096, 5000, {"tenant": "acme", "purpose": "kat"}),
]


def main():
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
    out = []
    for i, (name, suite, frame, length, context) in enumerate(VECTORS):
        dek = bytes([0x10 + i] * 16 + [0xA0 + i] * 16)
        message_id = bytes((j * 7 + i) % 256 for j in range(32))
        StaticMasterKey.DEK = dek
        StaticMasterKey.EDK = EDK
        sdk_utils.message_id = lambda size, mid=message_id: mid[:size]
        algorithm = {
            "0478": Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
            "0578": Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384,
        }[suite]
        key = StaticMasterKey(key_id=PROVIDER_INFO)
        message, header = client.encrypt(source=plaintext(length), key_provider=key,
                                         encryption_context=context, frame_length=frame,
                                         algorithm=algorithm)
        assert header.message_id == message_id
        decrypted, _ = client.decrypt(source=message, key_provider=key)
        assert decrypted == plaintext(length)
        out.append({
            "name": name,
            "suite": suite,
            "frame_length": frame,
            "plaintext_length": length,
            "plaintext_pattern": "byte i = (i * 31) % 251",
            "encryption_context": header.encryption_context,
            "dek": dek.hex(),
            "message_id": message_id.hex(),
            "provider_info": PROVIDER_INFO.decode(),
            "edk": EDK.hex(),
            "derived_key": hkdf(message_id, dek, bytes.fromhex(suite) + b"DERIVEKEY").hex(),
            "commitment": hkdf(message_id, dek, b"COMMITKEY").hex(),
            "message": message.hex(),
        })
    json.dump({"generator": "aws-encryption-sdk " + aws_encryption_sdk.__version__,
               "vectors": out}, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
