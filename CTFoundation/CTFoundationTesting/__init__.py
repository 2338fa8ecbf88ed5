"""Helpers of the module self-test (CTFoundationTest) and the pytest suites: small random checkpoints."""
