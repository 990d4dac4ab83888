"""Bearer tokens: verification, signing keys (JWKS) and the verified-token cache."""
