"""Interop helper: the official AWS Encryption SDK (Python) with a static data key.

Used by tests/esdk_interop.rs to check that wrapd's message format reads what the official
SDK writes and the other way round. The master key hands out a fixed data key (hex on the
command line), so only the message format is under test here.

    python3 esdk_static_key.py encrypt DEK_HEX IN OUT [FRAME_LENGTH] [SUITE]
    python3 esdk_static_key.py decrypt DEK_HEX IN OUT
"""
import sys

import aws_encryption_sdk
from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy
from aws_encryption_sdk.key_providers.base import MasterKey, MasterKeyConfig
from aws_encryption_sdk.structures import DataKey, EncryptedDataKey


class StaticMasterKeyConfig(MasterKeyConfig):
    provider_id = "wrapd"


class StaticMasterKey(MasterKey):
    provider_id = "wrapd"
    _config_class = StaticMasterKeyConfig

    DEK = b""
    # What the encrypted data key entries carry (tests/vectors/generate.py sets its own).
    EDK = b"static-edk"

    def __init__(self, **kwargs):  # pylint: disable=unused-argument
        self._dek = StaticMasterKey.DEK

    def owns_data_key(self, data_key):
        return data_key.key_provider.provider_id == self.provider_id

    def _generate_data_key(self, algorithm, encryption_context=None):
        return DataKey(key_provider=self.key_provider, data_key=self._dek, encrypted_data_key=StaticMasterKey.EDK)

    def _encrypt_data_key(self, data_key, algorithm, encryption_context=None):
        return EncryptedDataKey(key_provider=self.key_provider, encrypted_data_key=StaticMasterKey.EDK)

    def _decrypt_data_key(self, encrypted_data_key, algorithm, encryption_context=None):
        return DataKey(
            key_provider=self.key_provider,
            data_key=self._dek,
            encrypted_data_key=encrypted_data_key.encrypted_data_key,
        )


def main():
    mode, dek_hex, src, dst = sys.argv[1:5]
    StaticMasterKey.DEK = bytes.fromhex(dek_hex)
    key = StaticMasterKey(key_id=b"key/00112233445566778899aabbccddeeff")
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    with open(src, "rb") as f:
        data = f.read()
    if mode == "encrypt":
        frame = int(sys.argv[5]) if len(sys.argv) > 5 else 4096
        suite = sys.argv[6] if len(sys.argv) > 6 else "0478"
        algorithm = {
            "0478": Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
            "0578": Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384,
        }[suite]
        out, _ = client.encrypt(
            source=data,
            key_provider=key,
            encryption_context={"tenant": "acme", "purpose": "interop"},
            frame_length=frame,
            algorithm=algorithm,
        )
    else:
        out, header = client.decrypt(source=data, key_provider=key)
        assert header.encryption_context.get("tenant") == "acme", header.encryption_context
    with open(dst, "wb") as f:
        f.write(out)


if __name__ == "__main__":
    main()
