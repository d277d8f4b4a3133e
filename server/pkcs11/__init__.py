"""Everything that talks PKCS#11: the only package that imports python-pkcs11.

``token`` (module, login, pool), ``session`` (the operations on one session), ``pool``,
``mechanisms`` (the one table), ``templates`` (every object's attributes), ``errors`` (the one
classification of PKCS#11 outcomes) and ``objects`` (what the token says of a key, as a plain
value).
"""
