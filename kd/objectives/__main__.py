"""``python -m kd.objectives``: every declared objective, its needs and its parameters, as a markdown table."""

from kd.objectives.registry import table

print(table())
