"""The official AWS Encryption SDK for Python with its KMS master-key provider, pointed at
wrapd's AWS KMS API by the standard endpoint override (AWS_ENDPOINT_URL_KMS) and the dev
credentials: no custom provider, no wrapd code.

Usage: aws_kms_esdk.py encrypt|decrypt KEY_ARN IN OUT [K=V ...]
"""

import sys

import aws_encryption_sdk
from aws_encryption_sdk import CommitmentPolicy


def main():
    mode, arn, src, dst, *pairs = sys.argv[1:]
    context = dict(p.split("=", 1) for p in pairs)
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[arn])
    data = open(src, "rb").read()
    if mode == "encrypt":
        out, _ = client.encrypt(source=data, key_provider=provider, encryption_context=context)
    else:
        out, header = client.decrypt(source=data, key_provider=provider)
        for key, value in context.items():
            assert header.encryption_context.get(key) == value, header.encryption_context
        # The message names the key by the ARN it was configured with.
        infos = [k.key_provider.key_info for k in header.encrypted_data_keys]
        assert any(info.decode() == arn for info in infos), infos
    open(dst, "wb").write(out)


if __name__ == "__main__":
    main()
