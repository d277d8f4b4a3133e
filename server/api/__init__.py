"""The daemon's gRPC face: the call pipeline (``pipeline``), pb <-> domain conversions
(``convert``), one servicer module per service (``signer`` with its ``capgo`` and ``unwrap``
calls, ``admin``) and the access log (``accesslog``)."""
