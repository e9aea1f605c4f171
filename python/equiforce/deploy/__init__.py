"""Deployment: the exported TorchScript file, the compiled ops, evaluation and the audit of exported files."""
