"""Helpers the toy task YAMLs name with `!function utils.<name>` (lm-eval imports this file by path)."""

from ptm.toy.world import CITIES, COLOURS, PETS

_VALUES = {"city": list(CITIES), "colour": list(COLOURS), "pet": list(PETS)}


def world_qa_choices(doc):
    """The 8 values of the relation a world_qa item asks about (its reference is one of them)."""
    return _VALUES[doc["meta"]["relation"]]
