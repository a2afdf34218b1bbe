"""Modules that execute compressed weights for real: packed int4/int8 Linear layers on CPU and a lean decoder."""
