"""The audit trail's writing side (docs/adr/0006-audit-trail.md).

``config`` parses ``[audit]``; ``writer`` keeps one chain on disk; ``signing`` holds the
audit key; ``trail`` is what the call pipeline and the daemon use. The format and the
verifier are shared with the client in ``hsmsign.auditlog``.
"""
