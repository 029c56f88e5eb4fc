"""Secure aggregation: the coordinator learns the sum of the sampled workers' updates and nothing of any
one of them (SecAgg+, Bell et al., CCS 2020, after Bonawitz et al., CCS 2017), and still completes a
round when workers drop out after masking.

    crypto   X25519 + HKDF, AES-GCM for shares, the AES-CTR PRG, SHA-256 commitments
    shamir   t-of-n secret sharing over GF(2^521 − 1)
    ring     fixed-point encoding of an update in Z/2^64Z, its scale and error bound
    graph    who pairs with whom (k neighbours on a random ring), thresholds
    labels   what binds every key and commitment to one run, round attempt and pair
    client   a worker's side of one attempt
    server   the coordinator's side of one attempt, and the masked running sum
"""
