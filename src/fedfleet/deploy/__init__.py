"""Deployment helpers: ``fedfleet aws`` (CloudFormation stack, tokens, S3 artefacts) in ``aws``."""
