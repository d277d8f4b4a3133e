"""hsmsignd: the daemon that keeps RSA keys in a PKCS#11 token and serves sign/unwrap over gRPC."""
