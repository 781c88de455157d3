"""Centralised training: one model trained on every site's data pooled in one place.

An upper bound for reference, NOT federated learning — it needs the images that federated learning
exists to keep at their sites. The runner gives the strategy a single client holding the pooled data;
the "global" model is that client's model after each round.
"""

from iopfl.fl.base import Strategy


class Centralized(Strategy):
    name = "centralized"
    federated = False
    pooled = True
