"""The life of a bank: training steps shared by DVC and Prefect, gates, the registry of
candidates and production, packaging, inspection of parts and the audit trail."""
