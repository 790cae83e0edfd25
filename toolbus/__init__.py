"""The tool bus: leases, jailed file operations, sandboxed terminals and the audit log."""
