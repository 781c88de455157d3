"""Flower deployment of the same strategies (the only package that imports ``flwr``).

``server.app`` is the ServerApp, ``client.app`` the ClientApp; ``app/`` is the Flower app directory
given to ``flwr run``. See README, "Several machines (Flower)".
"""
