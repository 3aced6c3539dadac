"""Protobuf package ``mmtok``."""
