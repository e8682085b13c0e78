"""Locust load test of all three services at once, weighted like a typical mix of callers.

    python -m loadtests.run mixed             # headless, with reports and the SLO gate

The user classes are the per-service ones (their tasks check every answer); Locust runs every
User class it finds here, in proportion to `weight`.
"""

from loadtests.classifier import ClassifierUser
from loadtests.generator import GeneratorUser
from loadtests.policy import PolicyUser

PolicyUser.weight = 3
ClassifierUser.weight = 2
GeneratorUser.weight = 1

__all__ = ["ClassifierUser", "GeneratorUser", "PolicyUser"]
