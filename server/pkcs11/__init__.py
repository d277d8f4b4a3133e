"""Everything that talks PKCS#11: the only package that imports python-pkcs11.

``token`` (module, login, pool, fault recovery), ``session`` (the operations on one
session), ``scan`` (reading key objects), ``pool``, ``mechanisms`` (the one table),
``templates`` (every object's attributes), ``errors`` (the one classification of PKCS#11
outcomes), ``watchdog`` (a time limit on every call), ``objects`` (what the token says of a
key, as a plain value) and ``intercept`` (the seam tests use to inject faults).
"""
