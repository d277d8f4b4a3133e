"""Who may use which key: per-key grants with default deny, per-identity limits, and the gate
the call pipeline passes every call through (identity -> limits -> policy -> handler)."""

from server.policy.model import Grant, Limit, Operation, Policy

__all__ = ["Grant", "Limit", "Operation", "Policy"]
