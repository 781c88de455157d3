"""iopfl on Flower 1.41: the same strategies across machines (the only package that imports ``flwr``).

The round loop, selection and run directory are the federation core's (``iopfl.engine.federation``);
this package is the transport:

- ``server.app``: the ServerApp (the core over ``FlowerSites``); ``nodes``: messaging and which
  SuperNode serves which site; ``client.app``: the ClientApp (one site: its data, its personal state,
  its opt-in to publish its personalised model);
- ``wire``: what a message carries; ``state``: a site's own store of its personal state;
- ``errors``: a user's mistake ends an app in one line, as on the command line;
- ``app/``: the Flower app folder given to ``flwr run`` (package data: ``app_folder()``, ``iopfl flower
  app``; its pyproject.toml holds the run-config defaults).

See docs/deployment.md. Importing this package does not import ``flwr``.
"""

from pathlib import Path


def app_folder() -> Path:
    """The Flower app folder inside the installed package (what ``flwr run`` is given)."""
    return Path(__file__).resolve().parent / "app"
