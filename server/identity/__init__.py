"""Who is calling: identities from verified client certificates (``mtls``), CI OIDC tokens
(``oidc``) and, in development, the caller on this host (``local``).

``Identity`` is the value the policy, the limits and the audit log work with;
``current_identity()`` is the identity of the call being served (set by the call pipeline).
"""

from server.errors import Unauthenticated
from server.identity.model import Identity, current_identity

__all__ = ["Identity", "Unauthenticated", "current_identity"]
