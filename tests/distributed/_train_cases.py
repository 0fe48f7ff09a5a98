"""Placeholder until the trainer cases land."""


def distributed_cases(rank, world_size):
    return {}


def references():
    return {}
