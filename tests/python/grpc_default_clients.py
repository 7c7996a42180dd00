"""Every RPC of wrapd.v1 and the KMS v2 plugin through Python's grpcio over the unix sockets,
with grpcio's default channel options: no grpc.default_authority.

    python3 grpc_default_clients.py TARGET KMS_TARGET [AUTHORITY]
    python3 grpc_default_clients.py tls HOST:PORT CA CERT KEY AUTHORITY

The tls form calls ListKeys over mutual TLS with AUTHORITY as :authority and prints
"refused CODE" or "ok 1".

TARGET and KMS_TARGET are grpcio targets such as unix:///path or unix:/path. With AUTHORITY,
the channels send it as :authority (e.g. a percent-encoded socket path, as some clients do).
Prints "ok N" with the number of calls made; exits non-zero on the first failure.
"""
import atexit
import os
import shutil
import sys
import tempfile
import uuid

import grpc
from grpc_tools import protoc
import grpc_tools

PROTO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")


def stubs():
    out = tempfile.mkdtemp(prefix="wrapd-py-stubs-")
    atexit.register(shutil.rmtree, out, True)  # leave no stubs behind in /tmp
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    for proto in ["wrapd/v1/data_key.proto", "wrapd/v1/key.proto", "kms/v2/api.proto"]:
        status = protoc.main([
            "protoc", "-I", PROTO, "-I", include,
            "--python_out", out, "--grpc_python_out", out, proto,
        ])
        if status != 0:
            raise RuntimeError("protoc failed for " + proto)
    sys.path.insert(0, out)


def tls():
    address, ca, cert, key, authority = sys.argv[2:7]
    stubs()
    from wrapd.v1 import key_pb2 as k, key_pb2_grpc as k_grpc  # pylint: disable=import-error,import-outside-toplevel

    read = lambda path: open(path, "rb").read()  # noqa: E731
    credentials = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
    channel = grpc.secure_channel(address, credentials, options=[
        ("grpc.ssl_target_name_override", "localhost"), ("grpc.default_authority", authority)])
    try:
        k_grpc.KeyServiceStub(channel).ListKeys(k.ListKeysRequest(), timeout=10)
        print("ok 1")
    except grpc.RpcError as err:
        print("refused", err.code().name)


def main():
    if sys.argv[1] == "tls":
        tls()
        return
    target, kms_target = sys.argv[1], sys.argv[2]
    options = [("grpc.default_authority", sys.argv[3])] if len(sys.argv) > 3 else None
    stubs()
    # pylint: disable=import-error,import-outside-toplevel
    from wrapd.v1 import data_key_pb2 as dk, data_key_pb2_grpc as dk_grpc
    from wrapd.v1 import key_pb2 as k, key_pb2_grpc as k_grpc
    from kms.v2 import api_pb2 as kms, api_pb2_grpc as kms_grpc

    channel = grpc.insecure_channel(target, options=options)
    keys = k_grpc.KeyServiceStub(channel)
    data = dk_grpc.DataKeyServiceStub(channel)
    calls = 0

    def call(method, request, **kwargs):
        nonlocal calls
        calls += 1
        # A distinct request id per call: the client's HPACK table fills and evicts.
        metadata = (("x-request-id", uuid.uuid4().hex),)
        return method(request, timeout=10, metadata=metadata, **kwargs)

    alias = "alias/py-" + uuid.uuid4().hex[:12]
    key = call(keys.CreateKey, k.CreateKeyRequest(description="python", alias=alias))
    other = call(keys.CreateKey, k.CreateKeyRequest(description="python 2"))
    assert call(keys.DescribeKey, k.KeyRef(key_id=alias)).key_id == key.key_id
    assert any(m.key_id == key.key_id for m in call(keys.ListKeys, k.ListKeysRequest(page_size=1000)).keys)
    assert call(keys.RotateKey, k.KeyRef(key_id=key.key_id)).current_version == 2
    call(keys.DisableKey, k.KeyRef(key_id=other.key_id))
    call(keys.EnableKey, k.KeyRef(key_id=other.key_id))
    call(keys.ScheduleKeyDeletion, k.ScheduleKeyDeletionRequest(key_id=other.key_id, pending_window_days=7))
    call(keys.CancelKeyDeletion, k.KeyRef(key_id=other.key_id))
    call(keys.EnableKey, k.KeyRef(key_id=other.key_id))
    second = alias + "-b"
    call(keys.CreateAlias, k.AliasRequest(alias_name=second, key_id=key.key_id))
    call(keys.UpdateAlias, k.AliasRequest(alias_name=second, key_id=other.key_id))
    assert any(a.alias_name == second for a in call(keys.ListAliases, k.ListAliasesRequest()).aliases)
    call(keys.DeleteAlias, k.AliasRequest(alias_name=second))

    context = {"tenant": "python"}
    generated = call(data.GenerateDataKey, dk.GenerateDataKeyRequest(key_id=alias, encryption_context=context))
    assert len(generated.plaintext) == 32
    call(data.GenerateDataKeyWithoutPlaintext, dk.GenerateDataKeyRequest(key_id=alias, encryption_context=context))
    wrapped = call(data.Wrap, dk.WrapRequest(key_id=alias, plaintext=b"python secret", encryption_context=context))
    for _ in range(150):  # many calls on one connection
        opened = call(data.Unwrap, dk.UnwrapRequest(ciphertext_blob=wrapped.ciphertext_blob, encryption_context=context))
        assert opened.plaintext == b"python secret"
    moved = call(data.ReWrap, dk.ReWrapRequest(
        ciphertext_blob=generated.ciphertext_blob, source_encryption_context=context,
        destination_key_id=other.key_id, destination_encryption_context=context))
    back = call(data.Unwrap, dk.UnwrapRequest(ciphertext_blob=moved.ciphertext_blob, encryption_context=context))
    assert back.plaintext == generated.plaintext

    plugin = kms_grpc.KeyManagementServiceStub(grpc.insecure_channel(kms_target, options=options))
    assert call(plugin.Status, kms.StatusRequest()).healthz == "ok"
    sealed = call(plugin.Encrypt, kms.EncryptRequest(plaintext=b"k" * 32, uid="py-1"))
    opened = call(plugin.Decrypt, kms.DecryptRequest(ciphertext=sealed.ciphertext, key_id=sealed.key_id, uid="py-2"))
    assert opened.plaintext == b"k" * 32
    print("ok", calls)


if __name__ == "__main__":
    main()
