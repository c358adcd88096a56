"""Tenant policies: the schema, loading with line-numbered errors, and the pure decision function."""
