"""Writes service-2.json here: AWS KMS's service model as botocore ships it
(botocore/data/kms/2014-11-01/service-2.json, Apache-2.0), cut to what wrapd's AWS KMS API
validates requests against: the input shapes of the operations wrapd answers, with their
constraints (required, min, max, pattern, enum, sensitive) and without documentation.

Usage: python3 trim.py   (reads the model of the botocore that python3 imports)
"""

import gzip
import json
import os

import botocore

OPERATIONS = [
    "CancelKeyDeletion", "CreateAlias", "CreateGrant", "CreateKey", "Decrypt", "DeleteAlias",
    "DeleteImportedKeyMaterial", "DescribeKey", "DisableKey", "DisableKeyRotation", "EnableKey",
    "EnableKeyRotation", "Encrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext",
    "GenerateRandom", "GetKeyPolicy", "GetKeyRotationStatus", "GetParametersForImport",
    "ImportKeyMaterial", "ListAliases", "ListGrants", "ListKeyPolicies", "ListKeyRotations",
    "ListKeys", "ListResourceTags", "ListRetirableGrants", "PutKeyPolicy", "ReEncrypt",
    "RetireGrant", "RevokeGrant", "RotateKeyOnDemand", "ScheduleKeyDeletion", "TagResource",
    "UntagResource", "UpdateAlias", "UpdateKeyDescription",
]
KEPT = ["type", "required", "min", "max", "pattern", "enum", "sensitive"]


def main():
    data = os.path.join(os.path.dirname(botocore.__file__), "data", "kms", "2014-11-01")
    path = os.path.join(data, "service-2.json")
    if os.path.exists(path):
        model = json.load(open(path))
    else:
        model = json.load(gzip.open(path + ".gz"))
    shapes = {}

    def keep(name):
        if name in shapes:
            return
        shape = model["shapes"][name]
        out = {k: shape[k] for k in KEPT if k in shape}
        shapes[name] = out
        if shape["type"] == "structure":
            out["members"] = {m: {"shape": v["shape"]} for m, v in shape["members"].items()}
            for v in shape["members"].values():
                keep(v["shape"])
        elif shape["type"] == "list":
            out["member"] = {"shape": shape["member"]["shape"]}
            keep(shape["member"]["shape"])
        elif shape["type"] == "map":
            out["key"] = {"shape": shape["key"]["shape"]}
            out["value"] = {"shape": shape["value"]["shape"]}
            keep(shape["key"]["shape"])
            keep(shape["value"]["shape"])

    operations = {}
    for name in OPERATIONS:
        shape = model["operations"][name]["input"]["shape"]
        operations[name] = {"input": shape}
        keep(shape)
    trimmed = {
        "source": f"botocore {botocore.__version__}, data/kms/2014-11-01/service-2.json (Apache-2.0), cut by trim.py",
        "metadata": {"apiVersion": model["metadata"]["apiVersion"]},
        "operations": operations,
        "shapes": dict(sorted(shapes.items())),
    }
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "service-2.json"), "w") as f:
        json.dump(trimmed, f, indent=1, sort_keys=False)
        f.write("\n")


main()
