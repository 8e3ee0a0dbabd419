"""Strict JSON schemas of the Kubernetes kinds in cluster/ that the KubeRay CRDs do not embed.

Written from the Kubernetes API reference (networking.k8s.io/v1 NetworkPolicy, v1.30): every object
forbids keys it does not list, so a typo fails as it does for the CRD-checked manifests (the API
server would prune it silently, and a pruned selector admits more than it says).
"""

from __future__ import annotations

from typing import Any


def _obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR = _obj(
    {
        "matchLabels": _STRINGS,
        "matchExpressions": {
            "type": "array",
            "items": _obj(
                {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
                ("key", "operator"),
            ),
        },
    }
)
_PEER = _obj(
    {
        "podSelector": _LABEL_SELECTOR,
        "namespaceSelector": _LABEL_SELECTOR,
        "ipBlock": _obj({"cidr": {"type": "string"}, "except": {"type": "array", "items": {"type": "string"}}}, ("cidr",)),
    }
)
_PORT = _obj(
    {
        "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
        "port": {"type": ["integer", "string"]},
        "endPort": {"type": "integer"},
    }
)
_PORTS = {"type": "array", "items": _PORT}

NETWORK_POLICY = _obj(
    {
        "apiVersion": {"const": "networking.k8s.io/v1"},
        "kind": {"const": "NetworkPolicy"},
        "metadata": _obj(
            {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _STRINGS, "annotations": _STRINGS},
            ("name",),
        ),
        "spec": _obj(
            {
                "podSelector": _LABEL_SELECTOR,
                "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
                "ingress": {"type": "array", "items": _obj({"from": {"type": "array", "items": _PEER}, "ports": _PORTS})},
                "egress": {"type": "array", "items": _obj({"to": {"type": "array", "items": _PEER}, "ports": _PORTS})},
            },
            ("podSelector",),
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)
