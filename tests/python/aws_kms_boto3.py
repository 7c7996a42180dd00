"""boto3 (the official AWS SDK for Python) against wrapd's AWS KMS API.

Usage: aws_kms_boto3.py SCENARIO
Environment: WRAPD_AWS_URL (the endpoint), AWS_CA_BUNDLE (the dev CA), and the dev
credentials (AWS_SHARED_CREDENTIALS_FILE + AWS_PROFILE). Each scenario asserts what it
proves and prints one JSON line of facts for the Rust test to check further.
"""

import base64
import datetime
import json
import os
import sys
from unittest import mock

import boto3
import botocore
import botocore.auth
import botocore.session
from botocore.config import Config
from botocore.exceptions import ClientError

URL = os.environ["WRAPD_AWS_URL"]
NO_RETRIES = Config(retries={"max_attempts": 1, "mode": "standard"})


def kms(**kwargs):
    return boto3.client(
        "kms", endpoint_url=URL, region_name="us-east-1", config=kwargs.pop("config", NO_RETRIES), **kwargs
    )


def error_code(call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except ClientError as err:
        return err.response["Error"]["Code"], err.response["ResponseMetadata"]["HTTPStatusCode"]
    raise AssertionError(f"{call.__name__} succeeded")


def operations():
    c = kms()
    k1 = c.create_key(Description="first")["KeyMetadata"]
    k2 = c.create_key(Description="second", KeyUsage="ENCRYPT_DECRYPT", KeySpec="SYMMETRIC_DEFAULT")["KeyMetadata"]
    arn1, arn2 = k1["Arn"], k2["Arn"]
    assert arn1 == f"arn:aws:kms:us-east-1:111122223333:key/{k1['KeyId']}", k1
    assert k1["KeyState"] == "Enabled" and k1["Enabled"] is True and k1["KeySpec"] == "SYMMETRIC_DEFAULT", k1
    assert isinstance(k1["CreationDate"], datetime.datetime), k1

    c.create_alias(AliasName="alias/boto", TargetKeyId=k1["KeyId"])
    for form in [k1["KeyId"], arn1, "alias/boto", "arn:aws:kms:us-east-1:111122223333:alias/boto"]:
        assert c.describe_key(KeyId=form)["KeyMetadata"]["Arn"] == arn1, form
    aliases = c.list_aliases(KeyId=arn1)["Aliases"]
    assert [a["AliasName"] for a in aliases] == ["alias/boto"], aliases
    assert aliases[0]["AliasArn"] == "arn:aws:kms:us-east-1:111122223333:alias/boto", aliases
    c.update_alias(AliasName="alias/boto", TargetKeyId=arn2)
    assert c.describe_key(KeyId="alias/boto")["KeyMetadata"]["Arn"] == arn2
    c.update_alias(AliasName="alias/boto", TargetKeyId=arn1)

    ctx = {"tenant": "acme", "purpose": "boto3"}
    gdk = c.generate_data_key(KeyId="alias/boto", NumberOfBytes=32, EncryptionContext=ctx)
    assert gdk["KeyId"] == arn1 and len(gdk["Plaintext"]) == 32, gdk["KeyId"]
    wo = c.generate_data_key_without_plaintext(KeyId=arn1, KeySpec="AES_128", EncryptionContext=ctx)
    assert "Plaintext" not in wo and wo["KeyId"] == arn1
    assert len(c.decrypt(CiphertextBlob=wo["CiphertextBlob"], EncryptionContext=ctx)["Plaintext"]) == 16
    dec = c.decrypt(CiphertextBlob=gdk["CiphertextBlob"], EncryptionContext=ctx, KeyId=arn1)
    assert dec["Plaintext"] == gdk["Plaintext"] and dec["KeyId"] == arn1, dec["KeyId"]
    assert dec["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"

    enc = c.encrypt(KeyId=k1["KeyId"], Plaintext=b"attack at dawn", EncryptionContext=ctx)
    assert enc["KeyId"] == arn1
    re = c.re_encrypt(
        CiphertextBlob=enc["CiphertextBlob"],
        SourceEncryptionContext=ctx,
        SourceKeyId=arn1,
        DestinationKeyId=arn2,
        DestinationEncryptionContext={"tenant": "acme"},
    )
    assert re["SourceKeyId"] == arn1 and re["KeyId"] == arn2, re
    back = c.decrypt(CiphertextBlob=re["CiphertextBlob"], EncryptionContext={"tenant": "acme"})
    assert back["Plaintext"] == b"attack at dawn" and back["KeyId"] == arn2

    r1, r2 = (c.generate_random(NumberOfBytes=64)["Plaintext"] for _ in range(2))
    assert len(r1) == 64 and r1 != r2

    old_blob = gdk["CiphertextBlob"]
    assert c.rotate_key_on_demand(KeyId=arn1)["KeyId"] == arn1
    rotations = c.list_key_rotations(KeyId=arn1)["Rotations"]
    assert len(rotations) == 1 and rotations[0]["RotationType"] == "ON_DEMAND", rotations
    assert c.decrypt(CiphertextBlob=old_blob, EncryptionContext=ctx)["Plaintext"] == gdk["Plaintext"]
    assert c.get_key_rotation_status(KeyId=arn1)["KeyRotationEnabled"] is False
    c.enable_key_rotation(KeyId=arn1, RotationPeriodInDays=90)
    status = c.get_key_rotation_status(KeyId=arn1)
    assert status["KeyRotationEnabled"] is True and status["RotationPeriodInDays"] == 90, status
    assert status["NextRotationDate"] > datetime.datetime.now(datetime.timezone.utc), status
    c.disable_key_rotation(KeyId=arn1)
    assert c.get_key_rotation_status(KeyId=arn1)["KeyRotationEnabled"] is False

    tagged = c.create_key(Tags=[{"TagKey": "team", "TagValue": "payments"}])["KeyMetadata"]["Arn"]
    c.tag_resource(KeyId=tagged, Tags=[{"TagKey": "env", "TagValue": "prod"}, {"TagKey": "team", "TagValue": "billing"}])
    tags = c.list_resource_tags(KeyId=tagged)["Tags"]
    assert tags == [{"TagKey": "env", "TagValue": "prod"}, {"TagKey": "team", "TagValue": "billing"}], tags
    c.untag_resource(KeyId=tagged, TagKeys=["team"])
    assert c.list_resource_tags(KeyId=tagged)["Tags"] == [{"TagKey": "env", "TagValue": "prod"}]

    c.disable_key(KeyId=arn2)
    assert c.describe_key(KeyId=arn2)["KeyMetadata"]["KeyState"] == "Disabled"
    c.enable_key(KeyId=arn2)
    sched = c.schedule_key_deletion(KeyId=arn2, PendingWindowInDays=7)
    assert sched["KeyState"] == "PendingDeletion" and sched["PendingWindowInDays"] == 7, sched
    meta = c.describe_key(KeyId=arn2)["KeyMetadata"]
    assert meta["KeyState"] == "PendingDeletion" and "DeletionDate" in meta, meta
    assert c.cancel_key_deletion(KeyId=arn2)["KeyId"] == arn2
    assert c.describe_key(KeyId=arn2)["KeyMetadata"]["KeyState"] == "Disabled"

    listed = {k["KeyArn"] for k in c.list_keys()["Keys"]}
    assert {arn1, arn2, tagged} <= listed, listed
    c.delete_alias(AliasName="alias/boto")
    assert error_code(c.describe_key, KeyId="alias/boto")[0] == "NotFoundException"
    print(json.dumps({"key": arn1, "blob": base64.b64encode(old_blob).decode()}))


def pagination():
    c = kms()
    made = {c.create_key(Description=f"page {i}")["KeyMetadata"]["Arn"] for i in range(3)}
    seen, marker, pages = [], None, 0
    while True:
        args = {"Limit": 1} | ({"Marker": marker} if marker else {})
        page = c.list_keys(**args)
        pages += 1
        assert len(page["Keys"]) == 1, page
        seen += [k["KeyArn"] for k in page["Keys"]]
        if not page["Truncated"]:
            assert "NextMarker" not in page
            break
        marker = page["NextMarker"]
    assert made <= set(seen) and len(seen) == len(set(seen)) == pages, seen
    # The SDK's own paginator follows the same markers.
    paged = [k["KeyArn"] for p in c.get_paginator("list_keys").paginate(PaginationConfig={"PageSize": 1}) for k in p["Keys"]]
    assert paged == seen, (paged, seen)
    for i in range(2):
        c.create_alias(AliasName=f"alias/page-{i}", TargetKeyId=sorted(made)[i])
    aliases = [a["AliasName"] for p in c.get_paginator("list_aliases").paginate(PaginationConfig={"PageSize": 1}) for a in p["Aliases"]]
    assert {"alias/page-0", "alias/page-1"} <= set(aliases) and aliases == sorted(aliases), aliases
    print(json.dumps({"pages": pages}))


def errors():
    c = kms()
    found = {}
    key = c.create_key()["KeyMetadata"]["Arn"]
    other = c.create_key()["KeyMetadata"]["Arn"]
    blob = c.encrypt(KeyId=key, Plaintext=b"x")["CiphertextBlob"]
    found["NotFoundException"] = error_code(c.describe_key, KeyId="0" * 32)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    found["InvalidCiphertextException"] = error_code(c.decrypt, CiphertextBlob=tampered)
    found["IncorrectKeyException"] = error_code(c.decrypt, CiphertextBlob=blob, KeyId=other)
    found["ValidationException"] = error_code(c.generate_data_key, KeyId=key, NumberOfBytes=32, KeySpec="AES_256")
    c.create_alias(AliasName="alias/taken", TargetKeyId=key)
    found["AlreadyExistsException"] = error_code(c.create_alias, AliasName="alias/taken", TargetKeyId=other)
    found["UnsupportedOperationException"] = error_code(c.create_key, Origin="AWS_CLOUDHSM")
    found["InvalidAliasNameException"] = error_code(c.create_alias, AliasName="alias/aws/mine", TargetKeyId=other)
    found["InvalidMarkerException"] = error_code(c.list_keys, Marker="not-a-marker")
    c.disable_key(KeyId=key)
    found["DisabledException"] = error_code(c.encrypt, KeyId=key, Plaintext=b"x")
    c.enable_key(KeyId=key)
    c.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
    found["KMSInvalidStateException"] = error_code(c.decrypt, CiphertextBlob=blob)
    # A value outside a member's enumeration is the model's ValidationException.
    got, _ = error_code(c.create_key, KeyUsage="NOT_A_USAGE")
    assert got == "ValidationException", got
    assert error_code(c.delete_alias, AliasName="alias/aws/ebs")[0] == "NotFoundException"
    for code, (got, _) in found.items():
        assert got == code, (code, got)
    print(json.dumps({code: status for code, (_, status) in found.items()}))


def key_id_forms():
    """Where AWS takes only a key id or key ARN, an alias (name or ARN) is refused as AWS
    refuses it; where AWS takes an alias, it works."""
    c = kms()
    key = c.create_key()["KeyMetadata"]
    c.create_alias(AliasName="alias/forms", TargetKeyId=key["KeyId"])
    alias_arn = key["Arn"].split(":key/")[0] + ":alias/forms"
    refused = {}
    for alias in ["alias/forms", alias_arn]:
        for name, call, kwargs in [
            ("EnableKeyRotation", c.enable_key_rotation, {}),
            ("TagResource", c.tag_resource, {"Tags": [{"TagKey": "a", "TagValue": "b"}]}),
            ("DisableKey", c.disable_key, {}),
            ("ScheduleKeyDeletion", c.schedule_key_deletion, {"PendingWindowInDays": 7}),
            ("GetKeyRotationStatus", c.get_key_rotation_status, {}),
            ("ListResourceTags", c.list_resource_tags, {}),
        ]:
            refused[f"{name} {alias}"] = error_code(call, KeyId=alias, **kwargs)[0]
        refused[f"CreateAlias {alias}"] = error_code(
            c.create_alias, AliasName="alias/chained", TargetKeyId=alias
        )[0]
    # The key was left as it was; the forms AWS takes work.
    assert c.describe_key(KeyId="alias/forms")["KeyMetadata"]["KeyState"] == "Enabled"
    assert c.get_key_rotation_status(KeyId=key["Arn"])["KeyRotationEnabled"] is False
    c.generate_data_key(KeyId=alias_arn, NumberOfBytes=32)
    print(json.dumps(refused))


def key_policies():
    """Key policies as AWS answers them: the default policy, a policy that denies Decrypt
    without a context value, the lockout check and its bypass, a malformed document, and the
    sequence a Terraform aws_kms_key goes through."""
    c = kms()
    account = os.environ["WRAPD_ACCOUNT"]
    out = {}
    key = c.create_key()["KeyMetadata"]
    default = c.get_key_policy(KeyId=key["KeyId"], PolicyName="default")
    out["default_name"] = default["PolicyName"]
    out["default_principal"] = json.loads(default["Policy"])["Statement"][0]["Principal"]["AWS"]
    listed = c.list_key_policies(KeyId=key["Arn"])
    out["names"] = listed["PolicyNames"]
    out["truncated"] = listed["Truncated"]

    root = {"Sid": "root", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
            "Action": "kms:*", "Resource": "*"}
    tenant = {"Sid": "tenant", "Effect": "Deny", "Principal": "*", "Action": "kms:Decrypt", "Resource": "*",
              "Condition": {"Null": {"kms:EncryptionContext:tenant": "true"}}}
    policy = json.dumps({"Version": "2012-10-17", "Statement": [root, tenant]})
    c.put_key_policy(KeyId=key["KeyId"], PolicyName="default", Policy=policy)
    with_tenant = c.encrypt(KeyId=key["KeyId"], Plaintext=b"x", EncryptionContext={"tenant": "acme"})
    without = c.encrypt(KeyId=key["KeyId"], Plaintext=b"x")
    decrypted = c.decrypt(CiphertextBlob=with_tenant["CiphertextBlob"], EncryptionContext={"tenant": "acme"})
    out["decrypt_with_tenant"] = decrypted["Plaintext"] == b"x"
    out["decrypt_without_tenant"] = error_code(c.decrypt, CiphertextBlob=without["CiphertextBlob"])[0]
    out["stored"] = json.loads(c.get_key_policy(KeyId=key["KeyId"])["Policy"])["Statement"][1]["Sid"]

    other = c.create_key()["KeyMetadata"]["KeyId"]
    elsewhere = json.dumps({"Version": "2012-10-17", "Statement": [dict(root, Principal={"AWS": "999999999999"})]})
    out["lockout"] = error_code(c.put_key_policy, KeyId=other, PolicyName="default", Policy=elsewhere)[0]
    out["after_refused_lockout"] = c.describe_key(KeyId=other)["KeyMetadata"]["KeyState"]
    c.put_key_policy(KeyId=other, PolicyName="default", Policy=elsewhere, BypassPolicyLockoutSafetyCheck=True)
    out["locked_out"] = error_code(c.describe_key, KeyId=other)[0]
    out["malformed"] = error_code(c.put_key_policy, KeyId=key["KeyId"], PolicyName="default", Policy="{not json")[0]
    out["lockout_at_create"] = error_code(c.create_key, Policy=elsewhere)[0]

    # The Terraform aws_kms_key sequence.
    made = c.create_key(Description="tf", Policy=policy, Tags=[{"TagKey": "env", "TagValue": "test"}])["KeyMetadata"]
    arn = made["Arn"]
    described = c.describe_key(KeyId=arn)["KeyMetadata"]
    assert described["Description"] == "tf" and described["KeyState"] == "Enabled", described
    got = c.get_key_policy(KeyId=arn, PolicyName="default")
    assert json.loads(got["Policy"]) == json.loads(policy), got
    assert c.get_key_rotation_status(KeyId=arn)["KeyRotationEnabled"] is False
    assert c.list_resource_tags(KeyId=arn)["Tags"] == [{"TagKey": "env", "TagValue": "test"}]
    c.update_key_description(KeyId=arn, Description="tf, renamed")
    c.put_key_policy(KeyId=arn, PolicyName="default", Policy=json.dumps({"Version": "2012-10-17", "Statement": [root]}))
    assert len(json.loads(c.get_key_policy(KeyId=arn, PolicyName="default")["Policy"])["Statement"]) == 1
    deletion = c.schedule_key_deletion(KeyId=arn, PendingWindowInDays=7)
    assert deletion["KeyId"] == arn and deletion["KeyState"] == "PendingDeletion", deletion
    out["terraform"] = "ok"
    out["key"] = key["KeyId"]
    print(json.dumps(out))


def grants():
    """Grants as AWS KMS answers them: made by the key's owner for a worker (another access
    key), usable at once with the grant token, limited to their operations and context
    constraint, idempotent by name, listed page by page, retired and revoked, and handed on
    only narrower through a CreateGrant grant."""
    owner = kms()
    worker = kms(
        aws_access_key_id=os.environ["WRAPD_WORKER_ID"],
        aws_secret_access_key=os.environ["WRAPD_WORKER_SECRET"],
    )
    worker_arn = os.environ["WRAPD_WORKER_ARN"]
    account = worker_arn.split(":")[4]
    key = owner.create_key()["KeyMetadata"]
    kid = key["KeyId"]
    acme = {"tenant": "acme", "job": "1"}
    out = {}
    out["before"] = error_code(worker.encrypt, KeyId=kid, Plaintext=b"x", EncryptionContext=acme)[0]
    params = dict(
        KeyId=kid,
        GranteePrincipal=worker_arn,
        Operations=["Encrypt", "Decrypt", "RetireGrant"],
        Constraints={"EncryptionContextSubset": {"tenant": "acme"}},
        Name="worker-acme",
    )
    made = owner.create_grant(**params)
    assert len(made["GrantId"]) == 64 and made["GrantToken"], made
    sealed = worker.encrypt(KeyId=key["Arn"], Plaintext=b"x", EncryptionContext=acme, GrantTokens=[made["GrantToken"]])
    out["decrypt"] = worker.decrypt(CiphertextBlob=sealed["CiphertextBlob"], EncryptionContext=acme)["Plaintext"] == b"x"
    out["other_tenant"] = error_code(worker.encrypt, KeyId=kid, Plaintext=b"x", EncryptionContext={"tenant": "globex"})[0]
    out["no_context"] = error_code(worker.encrypt, KeyId=kid, Plaintext=b"x")[0]
    out["not_granted"] = error_code(worker.generate_data_key, KeyId=kid, NumberOfBytes=32, EncryptionContext=acme)[0]
    out["foreign_token"] = error_code(worker.encrypt, KeyId=kid, Plaintext=b"x", EncryptionContext=acme, GrantTokens=["bm90LWEtdG9rZW4"])[0]

    again = owner.create_grant(**params)
    out["same_id"] = again["GrantId"] == made["GrantId"]
    out["new_token"] = again["GrantToken"] != made["GrantToken"]
    other = owner.create_grant(**dict(params, Operations=["Decrypt"]))
    out["other_params_new_id"] = other["GrantId"] != made["GrantId"]
    for i in range(3):
        owner.create_grant(KeyId=kid, GranteePrincipal=f"arn:aws:iam::{account}:role/r{i}", Operations=["DescribeKey"])
    seen, marker, pages = [], None, 0
    while True:
        page = owner.list_grants(KeyId=key["Arn"], Limit=2, **({"Marker": marker} if marker else {}))
        pages += 1
        seen += page["Grants"]
        if not page["Truncated"]:
            assert "NextMarker" not in page, page
            break
        marker = page["NextMarker"]
    out["listed"] = len(seen)
    out["pages"] = pages
    out["distinct"] = len({g["GrantId"] for g in seen}) == len(seen)
    entry = next(g for g in seen if g["GrantId"] == made["GrantId"])
    assert entry["KeyId"] == key["Arn"], entry
    assert entry["GranteePrincipal"] == worker_arn and entry["Name"] == "worker-acme", entry
    assert sorted(entry["Operations"]) == ["Decrypt", "Encrypt", "RetireGrant"], entry
    assert entry["Constraints"] == {"EncryptionContextSubset": {"tenant": "acme"}}, entry
    assert entry["IssuingAccount"] == f"arn:aws:iam::{account}:root", entry
    assert isinstance(entry["CreationDate"], datetime.datetime), entry
    out["by_grantee"] = len(owner.list_grants(KeyId=kid, GranteePrincipal=worker_arn)["Grants"])
    out["by_id"] = [g["GrantId"] for g in owner.list_grants(KeyId=kid, GrantId=other["GrantId"])["Grants"]] == [other["GrantId"]]
    out["bad_marker"] = error_code(owner.list_grants, KeyId=kid, Marker="not-a-marker")[0]
    out["alias_refused"] = error_code(owner.list_grants, KeyId="alias/nothing")[0]

    owner.create_grant(KeyId=kid, GranteePrincipal=f"arn:aws:iam::{account}:role/r9",
                       RetiringPrincipal=worker_arn, Operations=["DescribeKey"])
    retirable = owner.list_retirable_grants(RetiringPrincipal=worker_arn)["Grants"]
    out["retirable"] = [g["GranteePrincipal"] for g in retirable]
    worker.retire_grant(KeyId=kid, GrantId=retirable[0]["GrantId"])
    out["retired_by_retiring_principal"] = owner.list_retirable_grants(RetiringPrincipal=worker_arn)["Grants"] == []

    worker.retire_grant(GrantToken=made["GrantToken"])
    out["after_retire"] = error_code(worker.encrypt, KeyId=kid, Plaintext=b"x", EncryptionContext=acme)[0]
    out["worker_revoke"] = error_code(worker.revoke_grant, KeyId=kid, GrantId=other["GrantId"])[0]
    out["worker_retire_other"] = error_code(worker.retire_grant, KeyId=kid, GrantId=other["GrantId"])[0]
    owner.revoke_grant(KeyId=kid, GrantId=other["GrantId"])
    out["revoked_again"] = error_code(owner.revoke_grant, KeyId=kid, GrantId=other["GrantId"])[0]
    out["bad_grant_id"] = error_code(owner.revoke_grant, KeyId=kid, GrantId="xyz")[0]
    out["sign_refused"] = error_code(owner.create_grant, KeyId=kid, GranteePrincipal=worker_arn, Operations=["Sign"])[0]
    out["unknown_op"] = error_code(owner.create_grant, KeyId=kid, GranteePrincipal=worker_arn, Operations=["Nope"])[0]

    owner.create_grant(KeyId=kid, GranteePrincipal=worker_arn, Operations=["Encrypt", "CreateGrant"],
                       Constraints={"EncryptionContextSubset": {"tenant": "acme"}})
    sub = f"arn:aws:iam::{account}:role/sub"
    narrower = worker.create_grant(KeyId=kid, GranteePrincipal=sub, Operations=["Encrypt"],
                                   Constraints={"EncryptionContextEquals": {"tenant": "acme", "job": "2"}})
    out["narrower"] = len(narrower["GrantId"]) == 64
    out["wider"] = error_code(worker.create_grant, KeyId=kid, GranteePrincipal=sub, Operations=["Encrypt", "Decrypt"],
                              Constraints={"EncryptionContextSubset": {"tenant": "acme"}})[0]
    out["unconstrained"] = error_code(worker.create_grant, KeyId=kid, GranteePrincipal=sub, Operations=["Encrypt"])[0]
    out["key"] = kid
    print(json.dumps(out))


def uuid_ids_and_regions():
    """Key ids as AWS writes them (UUIDs), the older 32-hex spelling still taken and echoed
    where the Encryption SDK compares it, and a second region (WRAPD_SECOND_REGION) the
    endpoint answers for: keys visible in both, answers in the region signed for."""
    import re

    c = kms()
    key = c.create_key()["KeyMetadata"]
    kid, arn = key["KeyId"], key["Arn"]
    out = {"uuid": bool(re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", kid)),
           "arn_ends_with_id": arn.endswith(f":key/{kid}")}
    hex_id = kid.replace("-", "")
    hex_arn = arn.replace(kid, hex_id)
    out["described_by_hex"] = c.describe_key(KeyId=hex_id)["KeyMetadata"]["Arn"] == arn
    enc = c.encrypt(KeyId=hex_arn, Plaintext=b"x")
    out["encrypt_echoes"] = enc["KeyId"] == hex_arn
    dec = c.decrypt(CiphertextBlob=enc["CiphertextBlob"], KeyId=hex_arn)
    out["decrypt_echoes"] = dec["KeyId"] == hex_arn
    out["decrypt_without_key"] = c.decrypt(CiphertextBlob=enc["CiphertextBlob"])["KeyId"] == arn
    out["generate_by_id"] = c.generate_data_key(KeyId=kid, NumberOfBytes=16)["KeyId"] == arn

    second = os.environ["WRAPD_SECOND_REGION"]
    far = boto3.client("kms", endpoint_url=URL, region_name=second, config=NO_RETRIES)
    far_arn = arn.replace(":us-east-1:", f":{second}:")
    out["far_describe"] = far.describe_key(KeyId=kid)["KeyMetadata"]["Arn"] == far_arn
    out["far_decrypts"] = far.decrypt(CiphertextBlob=enc["CiphertextBlob"])["KeyId"] == far_arn
    out["far_takes_home_arn"] = far.describe_key(KeyId=arn)["KeyMetadata"]["KeyId"] == kid
    out["home_takes_far_arn"] = c.describe_key(KeyId=far_arn)["KeyMetadata"]["Arn"] == arn
    elsewhere = boto3.client("kms", endpoint_url=URL, region_name="ap-south-1", config=NO_RETRIES)
    out["other_region"] = error_code(elsewhere.list_keys)[0]
    out["other_region_arn"] = error_code(c.describe_key, KeyId=arn.replace(":us-east-1:", ":ap-south-1:"))[0]
    print(json.dumps(out))


def model_constraints():
    """Every validation constraint of AWS KMS's service model (botocore's, as installed) on
    the top-level members of each operation wrapd answers, broken one at a time in a
    request that is otherwise valid for the model: each must be ValidationException, worded
    as AWS words it, naming the member and the constraint."""
    import re

    model = botocore.session.get_session().get_service_model("kms")
    # The operations wrapd answers: those of the model it checks requests against.
    with open(os.environ["WRAPD_KMS_MODEL"]) as f:
        answered = list(json.load(f)["operations"])
    assert len(answered) >= 37, answered
    c = kms(config=Config(parameter_validation=False, retries={"max_attempts": 1, "mode": "standard"}))

    def valid(shape, depth=0):
        kind = shape.type_name
        if kind == "string":
            if shape.enum:
                return shape.enum[0]
            return "a" * max(shape.metadata.get("min", 1), 1)
        if kind == "blob":
            return b"a" * max(shape.metadata.get("min", 1), 1)
        if kind in ("integer", "long"):
            return max(shape.metadata.get("min", 1), 1)
        if kind == "boolean":
            return False
        if kind == "timestamp":
            return datetime.datetime(2030, 1, 1)
        if kind == "list":
            return [valid(shape.member, depth + 1) for _ in range(shape.metadata.get("min", 0))]
        if kind == "map":
            return {}
        if kind == "structure":
            return {name: valid(shape.members[name], depth + 1) for name in shape.required_members}
        raise AssertionError(kind)

    def java_pattern(pattern):
        return pattern.replace("\\w", "0-9A-Za-z_")

    def broken(shape):
        """(value, the constraint phrase AWS's message must carry) for each constraint."""
        m = shape.metadata
        kind = shape.type_name
        out = []
        if kind in ("string", "blob", "list"):
            unit = {"string": "a", "blob": b"a"}.get(kind)
            make = (lambda n: unit * n) if unit is not None else (lambda n: [valid(shape.member)] * n)
            if m.get("min", 0) > 0:
                out.append((make(m["min"] - 1), f"Member must have length greater than or equal to {m['min']}"))
            if "max" in m and m["max"] <= 200_000:
                out.append((make(m["max"] + 1), f"Member must have length less than or equal to {m['max']}"))
        if kind == "string" and "pattern" in m:
            rx = re.compile(java_pattern(m["pattern"]))
            bad = next(v for v in ["!", "\u0100", "a b", "A"] if not rx.fullmatch(v))
            out.append((bad, "Member must satisfy regular expression pattern: " + m["pattern"]))
        if kind == "string" and shape.enum:
            out.append(("NOT_A_VALUE", "Member must satisfy enum value set: ["))
        if kind in ("integer", "long"):
            if "min" in m:
                out.append((m["min"] - 1, f"Member must have value greater than or equal to {m['min']}"))
            if "max" in m:
                out.append((m["max"] + 1, f"Member must have value less than or equal to {m['max']}"))
        return out

    cases, failures = 0, []
    for name in answered:
        op = model.operation_model(name)
        shape = op.input_shape
        base = valid(shape)
        method = getattr(c, botocore.xform_name(name))
        for member, member_shape in shape.members.items():
            path = member[0].lower() + member[1:]
            for value, phrase in broken(member_shape):
                cases += 1
                params = dict(base, **{member: value})
                try:
                    method(**params)
                    failures.append(f"{name}.{member} {phrase}: accepted")
                    continue
                except ClientError as err:
                    code = err.response["Error"]["Code"]
                    message = err.response["Error"].get("Message", "")
                if code != "ValidationException":
                    failures.append(f"{name}.{member} {phrase}: {code} {message[:200]}")
                elif not re.match(r"^\d+ validation errors? detected: ", message) or f"at '{path}' failed to satisfy constraint: {phrase}" not in message:
                    failures.append(f"{name}.{member} {phrase}: worded {message[:300]}")
    print(json.dumps({"cases": cases, "failures": failures}))


def worker_encrypt():
    """Run as the worker (WRAPD_WORKER_ID / WRAPD_WORKER_SECRET): an Encrypt under WRAPD_KEY."""
    worker = kms(
        aws_access_key_id=os.environ["WRAPD_WORKER_ID"],
        aws_secret_access_key=os.environ["WRAPD_WORKER_SECRET"],
    )
    try:
        worker.encrypt(KeyId=os.environ["WRAPD_KEY"], Plaintext=b"x")
        print(json.dumps({"code": "OK"}))
    except ClientError as err:
        print(json.dumps({"code": err.response["Error"]["Code"]}))


def outsider_encrypt():
    """Run with a profile whose principal has no grant: an Encrypt under WRAPD_KEY."""
    c = kms()
    try:
        c.encrypt(KeyId=os.environ["WRAPD_KEY"], Plaintext=b"x")
        print(json.dumps({"code": "OK"}))
    except ClientError as err:
        print(json.dumps({"code": err.response["Error"]["Code"]}))


def unavailable():
    """The audit log cannot be written (the Rust test broke it): DependencyTimeoutException."""
    c = kms()
    print(json.dumps({"code": error_code(c.list_keys)}))


def denied():
    """Run with a profile whose principal has no grant: denied whether or not the key exists."""
    c = kms()
    existing = os.environ["WRAPD_EXISTING_KEY"]
    codes = {
        "existing": error_code(c.describe_key, KeyId=existing)[0],
        "missing": error_code(c.describe_key, KeyId="f" * 32)[0],
        "generate_existing": error_code(c.generate_data_key, KeyId=existing, NumberOfBytes=32)[0],
        "generate_missing": error_code(c.generate_data_key, KeyId="f" * 32, NumberOfBytes=32)[0],
    }
    assert set(codes.values()) == {"AccessDeniedException"}, codes
    print(json.dumps(codes))


def impersonate():
    """Run with a profile whose principal has no grant: a second credential slipped into the
    Authorization header (which is not signed) names the dev key; it must not act as it."""
    victim = os.environ["WRAPD_VICTIM_KEY_ID"]
    found = {}
    for name, prefix in [("bare", ""), ("inside_another_name", "Foo=")]:
        c = kms()

        def inject(request, prefix=prefix, **_):
            auth = request.headers["Authorization"]
            if isinstance(auth, bytes):
                auth = auth.decode()
            # Replaced, not added: a second Authorization header is refused on its own.
            del request.headers["Authorization"]
            request.headers["Authorization"] = auth.replace(
                "AWS4-HMAC-SHA256 ", f"AWS4-HMAC-SHA256 {prefix}Credential={victim}/x, ", 1
            )

        c.meta.events.register("before-send.kms.*", inject)
        found[name] = error_code(c.list_keys)[0]
    found["plain"] = error_code(kms().list_keys)[0]
    expected = {
        "bare": "IncompleteSignatureException",
        "inside_another_name": "IncompleteSignatureException",
        "plain": "AccessDeniedException",
    }
    assert found == expected, found
    print(json.dumps(found))


def unsupported():
    """Correctly signed calls of operations wrapd does not have: refused, each audited."""
    c = kms()
    found = {
        "get_public_key": error_code(c.get_public_key, KeyId="f" * 32)[0],
        "sign": error_code(c.sign, KeyId="f" * 32, Message=b"m", SigningAlgorithm="ECDSA_SHA_256")[0],
    }
    assert set(found.values()) == {"UnsupportedOperationException"}, found
    print(json.dumps(found))


def unsigned_flood():
    """Many unsigned requests: each refused (the Rust test checks the audit log's bound)."""
    unsigned = kms(config=Config(signature_version=botocore.UNSIGNED, retries={"max_attempts": 1}))
    count = int(os.environ["WRAPD_FLOOD"])
    codes = {error_code(unsigned.list_keys)[0] for _ in range(count)}
    assert codes == {"MissingAuthenticationTokenException"}, codes
    print(json.dumps({"sent": count}))


def auth():
    real = boto3.Session().get_credentials()
    found = {}
    wrong_secret = kms(aws_access_key_id=real.access_key, aws_secret_access_key="A" * 40)
    found["wrong_secret"] = error_code(wrong_secret.list_keys)[0]
    unknown = kms(aws_access_key_id="AKIAUNKNOWNUNKNOWN00", aws_secret_access_key=real.secret_key)
    found["unknown_key"] = error_code(unknown.list_keys)[0]
    unsigned = kms(config=Config(signature_version=botocore.UNSIGNED, retries={"max_attempts": 1}))
    found["unsigned"] = error_code(unsigned.list_keys)[0]
    skewed = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) + datetime.timedelta(minutes=10)
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=skewed):
        found["ten_minutes_off"] = error_code(kms().list_keys)[0]
    expected = {
        "wrong_secret": "InvalidSignatureException",
        "unknown_key": "UnrecognizedClientException",
        "unsigned": "MissingAuthenticationTokenException",
        "ten_minutes_off": "InvalidSignatureException",
    }
    assert found == expected, found
    print(json.dumps({"access_key": real.access_key}))


if __name__ == "__main__":
    {
        "operations": operations,
        "pagination": pagination,
        "errors": errors,
        "key_id_forms": key_id_forms,
        "key_policies": key_policies,
        "outsider_encrypt": outsider_encrypt,
        "unavailable": unavailable,
        "denied": denied,
        "auth": auth,
        "impersonate": impersonate,
        "unsupported": unsupported,
        "grants": grants,
        "worker_encrypt": worker_encrypt,
        "uuid_ids_and_regions": uuid_ids_and_regions,
        "model_constraints": model_constraints,
        "unsigned_flood": unsigned_flood,
    }[sys.argv[1]]()
