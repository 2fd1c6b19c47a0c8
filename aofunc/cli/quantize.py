"""Placeholder: quantize."""


def add_arguments(p):
    pass


def run(args) -> int:
    raise NotImplementedError
