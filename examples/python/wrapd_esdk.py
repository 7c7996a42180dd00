"""A master-key provider for the official AWS Encryption SDK (Python), backed by wrapd.

Data keys come from wrapd over gRPC (unix socket or any gRPC target); files it writes are the
same as `wrapctl encrypt` writes (encrypted data key entries: provider id "wrapd", provider
info = the canonical key id, ciphertext = wrapd's blob bound to the message's encryption
context), so either side decrypts what the other encrypts.

    import aws_encryption_sdk
    from wrapd_esdk import WrapdMasterKeyProvider

    provider = WrapdMasterKeyProvider(target="unix:///path/to/wrapd.sock")
    provider.add_master_key("alias/payments")
    client = aws_encryption_sdk.EncryptionSDKClient()
    ciphertext, _ = client.encrypt(source=b"...", key_provider=provider,
                                   encryption_context={"tenant": "acme"})

Needs `aws-encryption-sdk`, `grpcio` and `grpcio-tools` (the gRPC stubs are generated from
wrapd's proto files on first use).
"""
import atexit
import os
import shutil
import sys
import tempfile

import attr
import grpc
from aws_encryption_sdk.key_providers.base import (
    MasterKey,
    MasterKeyConfig,
    MasterKeyProvider,
    MasterKeyProviderConfig,
)
from aws_encryption_sdk.structures import DataKey, EncryptedDataKey, MasterKeyInfo

PROVIDER_ID = "wrapd"
_PROTO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")
_stubs = None


def _load_stubs():
    """Generates (once) and imports the Python gRPC stubs of wrapd.v1."""
    global _stubs  # pylint: disable=global-statement
    if _stubs is None:
        from grpc_tools import protoc  # pylint: disable=import-outside-toplevel
        import grpc_tools  # pylint: disable=import-outside-toplevel

        out = tempfile.mkdtemp(prefix="wrapd-stubs-")
        atexit.register(shutil.rmtree, out, True)  # leave no stubs behind in /tmp
        include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        status = protoc.main([
            "protoc", "-I", _PROTO_DIR, "-I", include,
            "--python_out", out, "--grpc_python_out", out,
            "wrapd/v1/data_key.proto",
        ])
        if status != 0:
            raise RuntimeError("cannot generate the wrapd gRPC stubs")
        sys.path.insert(0, out)
        from wrapd.v1 import data_key_pb2, data_key_pb2_grpc  # pylint: disable=import-outside-toplevel,import-error

        _stubs = (data_key_pb2, data_key_pb2_grpc)
    return _stubs


@attr.s(hash=True)
class WrapdMasterKeyConfig(MasterKeyConfig):
    """A wrapd key (id or alias) on a daemon."""

    provider_id = PROVIDER_ID
    target = attr.ib(hash=True, default="unix:///.wrapd-dev/wrapd.sock")


class WrapdMasterKey(MasterKey):
    """One wrapd key."""

    provider_id = PROVIDER_ID
    _config_class = WrapdMasterKeyConfig

    def __init__(self, **kwargs):  # pylint: disable=unused-argument
        pb2, pb2_grpc = _load_stubs()
        self._pb2 = pb2
        # Default options: over a unix socket gRPC sends the socket path as :authority,
        # which plain HTTP/2 servers refuse, but wrapd rewrites it on its unix sockets, so
        # no grpc.default_authority is needed.
        channel = grpc.insecure_channel(self.config.target)
        self._stub = pb2_grpc.DataKeyServiceStub(channel)

    def owns_data_key(self, data_key):
        # Aliases and key ids name the same keys: the daemon decides.
        return data_key.key_provider.provider_id == PROVIDER_ID

    def _info(self, key_id):
        return MasterKeyInfo(provider_id=PROVIDER_ID, key_info=key_id.encode())

    def _generate_data_key(self, algorithm, encryption_context=None):
        response = self._stub.GenerateDataKey(self._pb2.GenerateDataKeyRequest(
            key_id=self.config.key_id.decode(),
            encryption_context=encryption_context or {},
            number_of_bytes=algorithm.kdf_input_len,
        ))
        return DataKey(
            key_provider=self._info(response.key_id),
            data_key=response.plaintext,
            encrypted_data_key=response.ciphertext_blob,
        )

    def _encrypt_data_key(self, data_key, algorithm, encryption_context=None):
        response = self._stub.Wrap(self._pb2.WrapRequest(
            key_id=self.config.key_id.decode(),
            plaintext=data_key.data_key,
            encryption_context=encryption_context or {},
        ))
        return EncryptedDataKey(key_provider=self._info(response.key_id), encrypted_data_key=response.ciphertext_blob)

    def _decrypt_data_key(self, encrypted_data_key, algorithm, encryption_context=None):
        response = self._stub.Unwrap(self._pb2.UnwrapRequest(
            ciphertext_blob=encrypted_data_key.encrypted_data_key,
            encryption_context=encryption_context or {},
        ))
        return DataKey(
            key_provider=encrypted_data_key.key_provider,
            data_key=response.plaintext,
            encrypted_data_key=encrypted_data_key.encrypted_data_key,
        )


@attr.s(hash=True)
class WrapdMasterKeyProviderConfig(MasterKeyProviderConfig):
    """Where the daemon is."""

    target = attr.ib(hash=True, default="unix:///.wrapd-dev/wrapd.sock")


class WrapdMasterKeyProvider(MasterKeyProvider):
    """wrapd keys on one daemon; decryption accepts any wrapd entry the daemon can unwrap."""

    provider_id = PROVIDER_ID
    _config_class = WrapdMasterKeyProviderConfig

    def __init__(self, **kwargs):  # pylint: disable=unused-argument
        self.vend_masterkey_on_decrypt = True

    def _new_master_key(self, key_id):
        key_id = key_id.decode() if isinstance(key_id, bytes) else key_id
        return WrapdMasterKey(key_id=key_id, target=self.config.target)
